"""callbacks/ and kernels/ import only as distill.callbacks / distill.kernels.

PyPI owns the bare names (transformers itself imports Hugging Face's ``kernels``), and a checkout's root is
on ``sys.path`` whenever someone runs ``python -m distill.train`` or pytest from it. The two folders carry no
``__init__.py``, so a real package of the same name always wins the bare name (PEP 420); ``distill/kernels``
and ``distill/callbacks`` link to them so that the checkout's ``distill`` package still finds them.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _resolve(name: str, cwd: Path, extra_path: Path | None = None) -> str:
    probe = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.find_spec({name!r})\n"
        "print('NONE' if spec is None else (spec.origin or 'NAMESPACE'))\n"
    )
    command = [sys.executable, "-c", probe]
    if extra_path is not None:  # after the checkout's root, as site-packages is
        command = [sys.executable, "-c", f"import sys; sys.path.append({str(extra_path)!r})\n{probe}"]
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=True)
    return result.stdout.strip()


@pytest.mark.parametrize("name", ["callbacks", "kernels"])
@pytest.mark.parametrize("from_root", [False, True], ids=["elsewhere", "checkout-root"])
def test_bare_names_never_resolve_to_a_module_of_this_project(name: str, from_root: bool, tmp_path: Path) -> None:
    origin = _resolve(name, cwd=ROOT if from_root else tmp_path)
    assert origin in ("NONE", "NAMESPACE") or not Path(origin).resolve().is_relative_to(ROOT / name)


@pytest.mark.parametrize("name", ["callbacks", "kernels"])
def test_a_package_owning_the_bare_name_wins_over_the_checkout(name: str, tmp_path: Path) -> None:
    owner = tmp_path / "site" / name
    owner.mkdir(parents=True)
    (owner / "__init__.py").write_text("")
    origin = _resolve(name, cwd=ROOT, extra_path=tmp_path / "site")
    # An installed package of that name (transformers brings ``kernels``) may win instead; the checkout never does.
    assert origin not in ("NONE", "NAMESPACE") and not Path(origin).resolve().is_relative_to(ROOT / name)


def test_subpackages_import_under_distill() -> None:
    import distill.callbacks.nm_sparsity
    import distill.kernels.sparsity

    assert Path(distill.callbacks.nm_sparsity.__file__).resolve().parent == ROOT / "callbacks"
    assert Path(distill.kernels.sparsity.__file__).resolve().parent == ROOT / "kernels"
