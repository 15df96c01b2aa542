"""Precomputed teacher logits: equal to the live teacher, reused, keyed, and refused when stale."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification

from distill.data.glue import EXAMPLE_INDEX
from distill.modules.distillation import DistillationModule
from distill.teacher_logits import TeacherLogitStore, precompute_teacher_logits
from distill.topk import TopKTargets, topk_targets
from distill.train import train


@pytest.fixture
def data_and_teacher(glue_module, data_dir: Path, tmp_path: Path, tiny_teacher_dir: Path):
    datamodule = glue_module(
        data_dir,
        tmp_path / "cache",
        train_limit=96,
        max_length=32,
        group_by_length=True,
        eval_batch_size=16,
        tokenizer=str(tiny_teacher_dir),
    )
    datamodule.prepare_data()
    datamodule.setup("fit")
    teacher = AutoModelForSequenceClassification.from_pretrained(tiny_teacher_dir).eval()
    return datamodule, teacher


def test_store_equals_the_live_teacher_and_is_reused(data_and_teacher, tmp_path: Path) -> None:
    datamodule, teacher = data_and_teacher
    store = precompute_teacher_logits(teacher, datamodule, str(tmp_path / "cache"))
    assert store.tensors["logits"].shape == (96, 2)
    for batch in datamodule.dataloader("train", 7, shuffle=False):
        index = batch.pop(EXAMPLE_INDEX)
        batch.pop("labels")
        with torch.no_grad():
            assert torch.allclose(store(index), teacher(**batch).logits, atol=1e-5)
    (path,) = (tmp_path / "cache" / "teacher_logits").glob("*.safetensors")
    stamp = path.stat().st_mtime_ns
    precompute_teacher_logits(teacher, datamodule, str(tmp_path / "cache"))
    assert path.stat().st_mtime_ns == stamp

    with torch.no_grad():
        teacher.classifier.bias.add_(1.0)  # another teacher: another store
    precompute_teacher_logits(teacher, datamodule, str(tmp_path / "cache"))
    assert len(list((tmp_path / "cache" / "teacher_logits").glob("*.safetensors"))) == 2


def test_a_store_built_for_other_data_is_refused(data_and_teacher, tmp_path: Path) -> None:
    datamodule, teacher = data_and_teacher
    precompute_teacher_logits(teacher, datamodule, str(tmp_path / "cache"))
    (path,) = (tmp_path / "cache" / "teacher_logits").glob("*.safetensors")
    with open(path, "rb") as handle:  # keep the tensor, rewrite the metadata as another run's
        header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
    metadata = {**header["__metadata__"], "train_examples": "someone-else"}
    save_file(load_file(path), str(path), metadata=metadata)
    with pytest.raises(ValueError, match=r"built for another run .*'train_examples': \('someone-else'"):
        precompute_teacher_logits(teacher, datamodule, str(tmp_path / "cache"))


def test_top_k_store_holds_the_live_teachers_top_k_and_has_its_own_key(data_and_teacher, tmp_path: Path) -> None:
    datamodule, teacher = data_and_teacher
    precompute_teacher_logits(teacher, datamodule, str(tmp_path / "cache"))
    store = precompute_teacher_logits(teacher, datamodule, str(tmp_path / "cache"), topk=1, temperature=2.0)
    assert sorted(store.tensors) == ["indices", "rest_log_mass", "values"]  # no full logits stored
    assert len(list((tmp_path / "cache" / "teacher_logits").glob("*.safetensors"))) == 2
    batch = next(iter(datamodule.dataloader("train", 16, shuffle=False)))
    index = batch.pop(EXAMPLE_INDEX)
    batch.pop("labels")
    cached = store(index)
    with torch.no_grad():
        live = topk_targets(teacher(**batch).logits, 1, 2.0)
    assert isinstance(cached, TopKTargets) and cached.temperature == 2.0
    assert torch.equal(cached.indices, live.indices)
    assert torch.allclose(cached.values, live.values, atol=1e-5)
    assert torch.allclose(cached.rest_log_mass, live.rest_log_mass, atol=1e-5)
    with pytest.raises(ValueError, match=r"distill.teacher_cache_topk=3 must be in \[1, 2\]"):
        precompute_teacher_logits(teacher, datamodule, str(tmp_path / "cache"), topk=3, temperature=2.0)


@pytest.mark.parametrize("topk", [None, 1])
def test_cached_targets_give_the_live_losses(data_and_teacher, tmp_path: Path, topk: int | None) -> None:
    # Two classes: the top-1 logit plus the rest bucket is the whole distribution, so K=1 is exact too.
    datamodule, teacher = data_and_teacher
    store = precompute_teacher_logits(teacher, datamodule, str(tmp_path / "cache"), topk=topk, temperature=2.0)
    losses = {}
    for name, logits in (("live", None), ("cached", store)):
        torch.manual_seed(0)
        student = AutoModelForSequenceClassification.from_pretrained(teacher.name_or_path)
        module = DistillationModule(
            student, teacher, 2, 2.0, 0.5, functools.partial(torch.optim.AdamW, lr=1e-3), teacher_logits=logits
        )
        batch = next(iter(datamodule.dataloader("train", 16, shuffle=False)))
        losses[name] = module.training_step(dict(batch), 0).item()
    assert losses["cached"] == pytest.approx(losses["live"], abs=1e-5)


def test_hidden_states_need_the_live_teacher(data_and_teacher) -> None:
    _, teacher = data_and_teacher
    store = TeacherLogitStore({"logits": torch.zeros(4, 2)}, {})
    with pytest.raises(ValueError, match=r"set distill\.hidden_weight=0"):
        DistillationModule(teacher, teacher, 2, 2.0, 0.5, torch.optim.AdamW, hidden_weight=1.0, teacher_logits=store)


def test_training_with_precomputed_logits(compose_train, tiny_run_overrides, tmp_path: Path) -> None:
    metrics = train(compose_train(*tiny_run_overrides, "distill.teacher_cache=precompute"))
    assert list((tmp_path / "cache" / "teacher_logits").glob("sst2-*.safetensors"))
    assert 0.0 <= metrics["student/val_acc"] <= 1.0
