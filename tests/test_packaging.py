"""One package root: callbacks/, kernels/ and conf/ import only as distill.callbacks / distill.kernels / distill.conf.

PyPI owns the bare names (transformers itself imports Hugging Face's ``kernels``), and a checkout's root is
on ``sys.path`` whenever someone runs ``python -m distill.train`` or pytest from it. The folders carry no
``__init__.py``, so a real package of the same name always wins the bare name (PEP 420). In a checkout
``distill/__init__.py`` adopts them; a wheel installs them inside ``distill/`` (pyproject's package-dir), and
a wheel installed into a fresh environment runs ``python -m distill.train`` from anywhere.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
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


def test_every_subpackage_ships_in_the_wheel() -> None:
    """setuptools installs only the packages pyproject lists: a new folder under distill/ must be listed."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {path.parent for path in (ROOT / "distill").rglob("*.py")}
    assert all((folder / "__init__.py").is_file() for folder in folders), "a folder of distill/ lacks __init__.py"
    found = {".".join(("distill", *folder.relative_to(ROOT / "distill").parts)) for folder in folders}
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages in pyproject.toml"


def test_conf_is_the_checkouts_folder() -> None:
    import distill.conf
    from distill.config.cli import CONFIG_DIR

    assert Path(CONFIG_DIR) == ROOT / "conf" == Path(next(iter(distill.conf.__path__)))


@pytest.fixture(scope="module")
def wheel_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The interpreter of a fresh virtual environment holding only the wheel built from this checkout; its
    dependencies come from this environment's site-packages, after its own (no download, no checkout)."""
    build = tmp_path_factory.mktemp("wheel")
    # From a copy of the sources: setuptools' build/ folder keeps modules that have since moved away.
    ignored = shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "logs", "__pycache__", ".*cache")
    source = shutil.copytree(ROOT, tmp_path_factory.mktemp("source") / "distill", ignore=ignored)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", build, source], check=True)
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = venv / "bin" / "python"
    site = Path(
        subprocess.check_output(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
        ).strip()
    )
    (wheel,) = build.glob("distill-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", site, wheel], check=True)
    (site / "zz_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def _run_outside(python: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    for name in ("HF_HOME", "DISTILL_DATA_DIR"):  # the README's are relative to the checkout, which cwd is not
        if name in env:
            env[name] = str(Path(env[name]).resolve())
    return subprocess.run([python, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_a_wheel_in_a_fresh_environment_composes_and_runs_a_smoke_job(
    wheel_python: Path, tmp_path: Path, tiny_run_overrides: list[str]
) -> None:
    where = _run_outside(
        wheel_python, tmp_path, "-c", "import distill.kernels.sparsity as m, distill.conf; print(m.__file__)"
    )
    assert where.returncode == 0, where.stderr
    assert not Path(where.stdout.strip()).resolve().is_relative_to(ROOT)
    job = _run_outside(wheel_python, tmp_path, "-m", "distill.train", "--cfg", "job", "experiment=bert_to_tiny")
    assert job.returncode == 0, job.stderr
    assert "task_name: bert_to_tiny" in job.stdout
    smoke = _run_outside(wheel_python, tmp_path, "-m", "distill.train", *tiny_run_overrides)
    assert smoke.returncode == 0, smoke.stderr[-3000:]
    assert (tmp_path / "run" / "metrics.json").is_file() and (tmp_path / "run" / "student" / "config.json").is_file()
