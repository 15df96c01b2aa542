"""The test tiers' markers: registered in pyproject.toml, and an unregistered marker fails the run.

`make test-fast` deselects the tiers by name; a misspelt marker (``distributd`` for ``distributed``) would
otherwise slip a slow test into the fast tier without a word.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

TIERS = {"slow", "slurm", "sweep", "concurrency", "distributed"}


def registered(config: pytest.Config) -> set[str]:
    return {line.split(":", 1)[0].split("(", 1)[0].strip() for line in config.getini("markers")}


def test_the_tier_markers_are_registered_and_markers_are_strict(pytestconfig: pytest.Config) -> None:
    assert registered(pytestconfig) >= TIERS
    assert pytestconfig.getoption("strict_markers"), "keep --strict-markers in pyproject's addopts"


def test_every_marker_the_tests_use_is_registered(pytestconfig: pytest.Config) -> None:
    used = {
        name
        for path in Path(__file__).parent.glob("*.py")
        for name in re.findall(r"pytest\.mark\.(\w+)", path.read_text())
    }
    assert used - registered(pytestconfig) == set(), "register these in [tool.pytest.ini_options] markers"
