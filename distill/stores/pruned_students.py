"""Structurally pruned students, cached: a recipe sweep measures the teacher's importance scores once.

Ranking 30 decoder layers by the loss when each is skipped costs 31 forward passes of the calibration
tokens (minutes on a CPU), and every recipe of a comparison starts from the same cut. The student is saved
with ``save_pretrained`` under ``cache_dir/pruned-<key>``, keyed by the teacher's weights, the calibration
tokens and the pruning settings, beside the scores and shape (``pruning.json``); a file lock makes
concurrent runs wait for the one that prunes, and the folder appears by an atomic rename when whole.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from filelock import FileLock
from torch import Tensor
from transformers import PreTrainedModel

from distill.utils.keys import digest, weights_fingerprint
from distill.utils.scratch import written_whole

log = logging.getLogger(__name__)

REPORT_FILE = "pruning.json"


def calibration_fingerprint(batches: list[Mapping[str, Tensor]]) -> str:
    hasher = hashlib.sha256()
    for batch in batches:
        for name in sorted(batch):
            hasher.update(name.encode())
            hasher.update(batch[name].contiguous().cpu().numpy().tobytes())
    return hasher.hexdigest()[:16]


def pruned_cache_key(teacher: PreTrainedModel, batches: list[Mapping[str, Tensor]], settings: Mapping[str, Any]) -> str:
    settings_text = json.dumps(settings, sort_keys=True, default=list)
    return digest([weights_fingerprint(teacher), calibration_fingerprint(batches), settings_text])


def cached_pruned_student(
    cache_dir: Path, key: str, model_class: type[PreTrainedModel], prune: Callable[[str], PreTrainedModel],
    report_path: str | None,
) -> PreTrainedModel:  # fmt: skip
    """The ``model_class`` student under ``cache_dir/pruned-<key>``, made by ``prune(report_path)`` on a miss."""
    target = cache_dir / f"pruned-{key}"
    target.parent.mkdir(parents=True, exist_ok=True)
    student = None
    with FileLock(str(target) + ".lock"):
        if (target / REPORT_FILE).is_file():
            log.info("Reusing the pruned student in %s", target)
        else:  # a miss keeps the model it just cut instead of reading it back
            with written_whole(target) as scratch:
                student = prune(str(scratch / REPORT_FILE))
                student.save_pretrained(scratch)
    if report_path is not None:
        Path(report_path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(target / REPORT_FILE, report_path)
    if student is None:
        student = model_class.from_pretrained(target)
    student.requires_grad_(True)
    return student.train()
