"""The fine-tuned teacher cache: keyed by settings, safe under concurrent jobs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from distill.data.glue import GlueDataModule
from distill.models.teacher import teacher_cache_key

PREPARE = """
import json, logging, sys
from distill.data.glue import GlueDataModule
from distill.models.teacher import prepare_teacher
from distill.tasks import ClassificationTask
logging.basicConfig(level=logging.INFO, format="%(message)s")
teacher_dir, data_dir, cache_dir = sys.argv[1:4]
datamodule = GlueDataModule(task="sst2", text_fields=["sentence"], data_dir=data_dir, cache_dir=cache_dir + "/data",
                            tokenizer=teacher_dir, num_labels=2, train_limit=64, val_limit=32, max_length=32)
settings = dict(epochs=1, max_steps=4, lr=1e-3, batch_size=16, weight_decay=0.0, warmup_ratio=0.0, seed=0)
teacher = prepare_teacher(teacher_dir, datamodule, ClassificationTask(2), finetune=True,
                          cache_dir=cache_dir + "/teachers", finetune_settings=settings)
print("RESULT " + json.dumps({"path": teacher.path, "val_acc": teacher.val_score}))
"""


@pytest.mark.concurrency
def test_concurrent_jobs_fine_tune_once(tiny_teacher_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    args = [sys.executable, "-c", PREPARE, str(tiny_teacher_dir), str(data_dir), str(tmp_path)]
    jobs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [job.communicate(timeout=600)[0] for job in jobs]
    assert all(job.returncode == 0 for job in jobs), outputs
    log = "".join(outputs)
    assert log.count("Fine-tuning teacher") == 1 and log.count("Reusing the fine-tuned teacher") == 1
    results = [
        json.loads(line.split("RESULT ", 1)[1]) for out in outputs for line in out.splitlines() if "RESULT" in line
    ]
    assert len(results) == 2 and results[0] == results[1]
    cached = [p for p in (tmp_path / "teachers").iterdir() if p.is_dir()]
    assert [p.name for p in cached] == [Path(results[0]["path"]).name]  # no scratch folder left behind
    info = json.loads((cached[0] / "teacher_info.json").read_text())
    assert info["val_acc"] == results[0]["val_acc"] and info["steps"] == 4


def test_cache_key_changes_with_settings_and_data(tiny_teacher_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    def key(settings: dict, **data) -> str:
        datamodule = GlueDataModule(
            task="sst2",
            text_fields=["sentence"],
            data_dir=str(data_dir),
            cache_dir=str(tmp_path),
            tokenizer=str(tiny_teacher_dir),
            num_labels=2,
            **data,
        )
        return teacher_cache_key(str(tiny_teacher_dir), datamodule, settings)

    base = key({"lr": 1e-4})
    assert base == key({"lr": 1e-4})
    assert len({base, key({"lr": 5e-5}), key({"lr": 1e-4}, max_length=64), key({"lr": 1e-4}, train_limit=10)}) == 4
