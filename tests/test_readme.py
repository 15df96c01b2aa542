"""What the README names exists: every dotted distill path imports, every linked file is in the checkout."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
# `distill.alpha=0.1` and the like are config overrides (the `distill` group), not module paths.
DOTTED = sorted(set(re.findall(r"\bdistill(?:\.\w+)+\b(?![\w.]*=)", README)))


def resolve(dotted: str) -> object:
    """The module that ``dotted`` names, or the attribute of its longest importable module prefix."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            found = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            found = getattr(found, name)
        return found
    raise ModuleNotFoundError(dotted)


def test_the_readme_names_module_paths() -> None:
    assert len(DOTTED) > 10 and "distill.kernels.kd_loss.fused_kd_loss" in DOTTED


@pytest.mark.parametrize("dotted", DOTTED)
def test_every_dotted_path_the_readme_names_imports(dotted: str) -> None:
    resolve(dotted)


def test_every_linked_file_exists() -> None:
    links = re.findall(r"\]\(((?:docs|launch|bench|conf|tests)/[^)#]+)", README)
    assert links and [link for link in links if not (ROOT / link).exists()] == []
