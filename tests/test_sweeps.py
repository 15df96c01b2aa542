"""Sweep presets: a local multirun per preset kind, the Optuna budget objective, and its scoring."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from distill.train import objective

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("metrics", "expected"),
    [
        ({"student/val_acc": 0.8, "compression/size_bytes": 10}, 0.8),
        ({"student/val_acc": 0.8, "compression/size_bytes": 1000}, -1.0),
        ({"student/val_acc": 0.8}, 0.8),
    ],
)
def test_objective_scores_over_budget_runs(metrics: dict, expected: float) -> None:
    cfg = OmegaConf.create(
        {"objective": {"metric": "student/val_acc", "max_size_bytes": 100, "over_budget_score": -1.0}}
    )
    assert objective(cfg, metrics) == expected


@pytest.mark.sweep
def test_optuna_budget_sweep_runs_trials(tmp_path: Path, tiny_run_overrides: list[str]) -> None:
    overrides = [o for o in tiny_run_overrides if not o.startswith("paths.output_dir")]
    command = [
        sys.executable,
        "-m",
        "distill.train",
        "-m",
        "sweep=optuna_budget",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.n_jobs=1",
        "compression.magnitude_pruning.start_step=0",
        "compression.magnitude_pruning.end_step=4",
        "compression.magnitude_pruning.frequency=2",
        *overrides,
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    best = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    assert "best_params" in best and 0.0 <= best["best_value"] <= 1.0
    assert len(list((tmp_path / "sweep").glob("*/metrics.json"))) == 2
