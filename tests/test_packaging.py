"""callbacks/ and kernels/ import only as distill.callbacks / distill.kernels."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize("name", ["callbacks", "kernels"])
def test_top_level_names_do_not_resolve_to_this_project(name: str, tmp_path: Path) -> None:
    probe = (
        "import importlib.util, pathlib, distill\n"
        f"spec = importlib.util.find_spec({name!r})\n"
        "root = pathlib.Path(distill.__file__).resolve().parents[1]\n"
        "inside = spec is not None and spec.origin and pathlib.Path(spec.origin).resolve().is_relative_to(root)\n"
        "print('RESOLVES_HERE' if inside else 'OK')\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "OK"


def test_subpackages_import_under_distill() -> None:
    import distill.callbacks
    import distill.kernels

    assert Path(distill.callbacks.__file__).parent.name == "callbacks"
    assert Path(distill.kernels.__file__).parent.name == "kernels"
