"""What a run folder records besides Hydra's .hydra/: git state, student architecture, metrics."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from torch import nn

import distill
from distill.utils.sharding import whole


def git_state() -> dict[str, Any]:
    """Commit and dirty flag of the checkout that holds the installed package, if any."""
    source = Path(distill.__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=source, capture_output=True, text=True, check=True).stdout.strip()

    try:
        return {
            "commit": git("rev-parse", "HEAD"),
            "dirty": bool(git("status", "--porcelain")),
            "repo": git("rev-parse", "--show-toplevel"),
        }
    except (OSError, subprocess.CalledProcessError) as error:
        return {"commit": None, "dirty": None, "error": f"not a git checkout ({type(error).__name__})"}


def count_parameters(model: nn.Module) -> dict[str, int]:
    params = list(model.parameters())
    return {
        "params": sum(p.numel() for p in params),
        "nonzero_params": sum(int(whole(p).count_nonzero()) for p in params),
    }


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def record_student(output_dir: Path, student: nn.Module) -> None:
    """The student's module tree and HF config, so the run shows what was trained."""
    output_dir.mkdir(parents=True, exist_ok=True)
    counts = count_parameters(student)
    (output_dir / "student_architecture.txt").write_text(f"{student}\n\nparameters: {counts['params']:,}\n")
    config = getattr(student, "config", None)
    if config is not None:
        write_json(output_dir / "student_config.json", config.to_dict())
