"""Precomputed teacher logits: equal to the live teacher, reused, keyed, and refused when stale."""

from __future__ import annotations

import contextlib
import functools
import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification

from distill.losses.topk import TopKTargets, topk_targets
from distill.modules.distillation import DistillationModule
from distill.pipeline.stages import StageSettings
from distill.stores import teacher_logits
from distill.stores.teacher_logits import TeacherLogitStore, precompute_teacher_logits
from distill.train import train
from distill.utils.keys import AUGMENTED_PREFIX, COPY_FINGERPRINT, EXAMPLE_INDEX
from tests.test_module import fit


def tiny_data_and_teacher(glue_module, data_dir: Path, cache_dir: Path, teacher_dir: Path, **settings):
    datamodule = glue_module(
        data_dir,
        cache_dir,
        train_limit=96,
        max_length=32,
        group_by_length=True,
        eval_batch_size=16,
        tokenizer=str(teacher_dir),
        **settings,
    )
    datamodule.prepare_data()
    datamodule.setup("fit")
    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir).eval()
    return datamodule, teacher


@pytest.fixture
def data_and_teacher(glue_module, data_dir: Path, tmp_path: Path, tiny_teacher_dir: Path):
    return tiny_data_and_teacher(glue_module, data_dir, tmp_path / "cache", tiny_teacher_dir)


@pytest.fixture
def data_with_copies(glue_module, data_dir: Path, tmp_path: Path, tiny_teacher_dir: Path):
    """Batches of 8 with two perturbed copies each, as bert_to_tiny draws them."""
    augment = {"copies": 2}
    return tiny_data_and_teacher(
        glue_module, data_dir, tmp_path / "cache", tiny_teacher_dir, batch_size=8, augment=augment
    )


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


def live_top_k(teacher, datamodule, k: int, temperature: float) -> tuple[torch.Tensor, TopKTargets]:
    batch = next(iter(datamodule.dataloader("train", 16, shuffle=False)))
    index = batch.pop(EXAMPLE_INDEX)
    batch.pop("labels")
    with torch.no_grad():
        return index, topk_targets(teacher(**batch).logits, k, temperature)


@pytest.mark.slow
def test_one_top_k_store_serves_each_temperature_it_lists_and_grows_for_another(
    data_and_teacher, tmp_path: Path
) -> None:
    datamodule, teacher = data_and_teacher
    cache = str(tmp_path / "cache")
    store = precompute_teacher_logits(teacher, datamodule, cache, topk=1, temperature=1.0, temperatures=[2.0])
    (path,) = (tmp_path / "cache" / "teacher_logits").glob("*.safetensors")
    stamp = path.stat().st_mtime_ns
    assert store.temperatures == (1.0, 2.0) and store.tensors["rest_log_mass"].shape == (96, 2)
    at_two = precompute_teacher_logits(teacher, datamodule, cache, topk=1, temperature=2.0)
    assert path.stat().st_mtime_ns == stamp  # the run at T = 2 reuses the first run's teacher pass
    index, live = live_top_k(teacher, datamodule, 1, 2.0)
    cached = at_two(index)
    assert cached.temperature == 2.0 and torch.equal(cached.indices, live.indices)
    assert torch.allclose(cached.rest_log_mass, live.rest_log_mass, atol=1e-5)
    _, live_at_one = live_top_k(teacher, datamodule, 1, 1.0)
    assert torch.allclose(store(index).rest_log_mass, live_at_one.rest_log_mass, atol=1e-5)

    at_four = precompute_teacher_logits(teacher, datamodule, cache, topk=1, temperature=4.0)
    assert at_four.temperatures == (1.0, 2.0, 4.0)  # rebuilt for the union, in place
    assert list((tmp_path / "cache" / "teacher_logits").glob("*.safetensors")) == [path]
    _, live = live_top_k(teacher, datamodule, 1, 4.0)
    assert torch.allclose(at_four(index).rest_log_mass, live.rest_log_mass, atol=1e-5)
    with pytest.raises(ValueError, match=r"distill.temperature=3.0: .* T in \[1.0, 2.0, 4.0\] only"):
        at_four.at(3.0)


def test_store_temperatures_must_be_positive() -> None:
    with pytest.raises(ValueError, match=r"teacher_cache_temperatures has 0.0; temperatures must be > 0"):
        StageSettings(teacher_cache="precompute", teacher_cache_topk=8, teacher_cache_temperatures=[1.0, 0.0])


@pytest.mark.slow
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


@pytest.mark.slow
def test_hidden_states_need_the_live_teacher(data_and_teacher) -> None:
    _, teacher = data_and_teacher
    store = TeacherLogitStore({"logits": torch.zeros(4, 2)}, {})
    with pytest.raises(ValueError, match=r"set distill\.hidden_weight=0"):
        DistillationModule(teacher, teacher, 2, 2.0, 0.5, torch.optim.AdamW, hidden_weight=1.0, teacher_logits=store)


@pytest.mark.slow
def test_training_with_precomputed_logits(compose_train, tiny_run_overrides, tmp_path: Path) -> None:
    metrics = train(compose_train(*tiny_run_overrides, "distill.teacher_cache=precompute"))
    assert list((tmp_path / "cache" / "teacher_logits").glob("sst2-*.safetensors"))
    assert 0.0 <= metrics["student/val_acc"] <= 1.0


def split_copies(batch: dict) -> dict:
    return {
        key.removeprefix(AUGMENTED_PREFIX): value for key, value in batch.items() if key.startswith(AUGMENTED_PREFIX)
    }


def assert_store_serves_every_copy(store, teacher, loader, epochs: int) -> None:
    """The store's targets for every copy ``loader`` draws in ``epochs`` epochs are the live teacher's."""
    for epoch in range(epochs):
        loader.batch_sampler.set_epoch(epoch)
        for batch in loader:
            cached = store.lookup(epoch, batch[EXAMPLE_INDEX], batch[COPY_FINGERPRINT])
            with torch.no_grad():
                live = teacher(**split_copies(batch)).logits
            assert cached is not None and torch.allclose(cached, live, atol=1e-5)


@pytest.mark.slow
def test_copy_store_holds_the_copies_each_epoch_of_training_draws(data_with_copies, tmp_path: Path) -> None:
    datamodule, teacher = data_with_copies
    store = precompute_teacher_logits(teacher, datamodule, str(tmp_path / "cache"), epochs=2).copies
    assert store.tensors["logits"].shape == (2 * 2 * 96, 2)
    loader = datamodule.train_dataloader()  # a fresh loader, as fit builds it
    assert_store_serves_every_copy(store, teacher, loader, epochs=2)
    batch = next(iter(loader))  # a third epoch: not stored
    assert store.lookup(2, batch[EXAMPLE_INDEX], batch[COPY_FINGERPRINT]) is None

    restarted = datamodule.train_dataloader()  # e.g. a resumed run: epoch 1 drawn from a restarted stream
    restarted.batch_sampler.set_epoch(1)
    batch = next(iter(restarted))
    assert store.lookup(1, batch[EXAMPLE_INDEX], batch[COPY_FINGERPRINT]) is None


def rank_loader(datamodule, rank: int):
    return datamodule.dataloader("train", datamodule.batch_size, True, augment=True, shard=(rank, 2))


@pytest.mark.slow
def test_copy_store_for_two_ranks_holds_the_copies_each_rank_draws(data_with_copies, tmp_path: Path) -> None:
    datamodule, teacher = data_with_copies
    single = precompute_teacher_logits(teacher, datamodule, str(tmp_path / "cache"), epochs=2).copies
    store = precompute_teacher_logits(teacher, datamodule, str(tmp_path / "cache"), epochs=2, replicas=2).copies
    for rank in (0, 1):
        assert_store_serves_every_copy(store, teacher, rank_loader(datamodule, rank), epochs=2)
    # One process draws every batch from one stream: rank 1 starts its own, which that store lacks.
    batch = next(iter(rank_loader(datamodule, 1)))
    assert single.lookup(0, batch[EXAMPLE_INDEX], batch[COPY_FINGERPRINT]) is None


@pytest.mark.slow
def test_the_copies_replay_runs_the_teacher_where_the_main_pass_does(
    data_with_copies, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every teacher forward of both store passes runs inside on_gpu_if_any (on a GPU when there is one),
    its inputs on the device it picked: the copies' replay once ran on the teacher's CPU home."""
    datamodule, teacher = data_with_copies
    picked: list[torch.device] = []
    on_gpu_if_any = teacher_logits.on_gpu_if_any

    @contextlib.contextmanager
    def recording(model):
        with on_gpu_if_any(model) as device:
            picked.append(device)
            yield device
            picked.pop()

    monkeypatch.setattr(teacher_logits, "on_gpu_if_any", recording)
    misplaced = []

    def check_placement(module, args, kwargs) -> None:
        devices = {value.device for value in kwargs.values() if isinstance(value, torch.Tensor)}
        if not picked or devices != {picked[-1]}:
            misplaced.append(devices)

    teacher.register_forward_pre_hook(check_placement, with_kwargs=True)
    store = precompute_teacher_logits(teacher, datamodule, str(tmp_path / "cache"))
    assert store.copies is not None and misplaced == []


@pytest.mark.slow
def test_copy_store_is_keyed_by_the_augmentation(data_with_copies, tmp_path: Path) -> None:
    datamodule, teacher = data_with_copies
    precompute_teacher_logits(teacher, datamodule, str(tmp_path / "cache"))
    precompute_teacher_logits(teacher, datamodule, str(tmp_path / "cache"), replicas=2)
    datamodule.augmenter.mask_prob = 0.3
    precompute_teacher_logits(teacher, datamodule, str(tmp_path / "cache"))
    precompute_teacher_logits(teacher, datamodule, str(tmp_path / "cache"), epochs=2)
    assert len(list((tmp_path / "cache" / "teacher_logits").glob("sst2-copies-*.safetensors"))) == 4
    assert len(list((tmp_path / "cache" / "teacher_logits").glob("sst2-*.safetensors"))) == 5


class CountTeacherCalls(pl.Callback):
    def __init__(self, teacher) -> None:
        self.calls = 0
        self.hook = teacher.register_forward_hook(self.count)
        self.losses: list[float] = []

    def count(self, *args) -> None:
        self.calls += 1

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def fit_two_epochs(datamodule, teacher, store, tmp_path: Path) -> tuple[DistillationModule, CountTeacherCalls]:
    pl.seed_everything(0)
    student = AutoModelForSequenceClassification.from_pretrained(teacher.name_or_path)
    optimizer = functools.partial(torch.optim.AdamW, lr=1e-3)
    module = DistillationModule(student, teacher, 2, 2.0, 0.5, optimizer, teacher_logits=store)
    counter = CountTeacherCalls(teacher)
    fit(module, tmp_path, [counter], validate=False, train_loader=datamodule.train_dataloader())
    counter.hook.remove()
    return module, counter


@pytest.mark.slow
def test_training_with_the_copy_store_runs_no_teacher_and_gives_the_live_losses(data_with_copies, tmp_path) -> None:
    datamodule, teacher = data_with_copies
    store = precompute_teacher_logits(teacher, datamodule, str(tmp_path / "cache"), epochs=2)
    cached, cached_calls = fit_two_epochs(datamodule, teacher, store, tmp_path / "cached")
    _, live_calls = fit_two_epochs(datamodule, teacher, None, tmp_path / "live")
    assert cached.copy_targets.labelled_live == 0 and cached_calls.calls == 0
    assert live_calls.calls == 2 * 2 * 12  # originals and copies, 12 batches an epoch
    assert cached_calls.losses == pytest.approx(live_calls.losses, abs=1e-5)


@pytest.mark.slow
def test_copies_the_store_lacks_are_labelled_live(data_with_copies, tmp_path: Path) -> None:
    datamodule, teacher = data_with_copies
    store = precompute_teacher_logits(teacher, datamodule, str(tmp_path / "cache"))
    losses = {}
    for name, logits in (("live", None), ("store", store)):
        torch.manual_seed(0)
        student = AutoModelForSequenceClassification.from_pretrained(teacher.name_or_path)
        module = DistillationModule(student, teacher, 2, 2.0, 0.5, torch.optim.AdamW, teacher_logits=logits)
        batch = next(iter(datamodule.train_dataloader()))
        batch[COPY_FINGERPRINT] = batch[COPY_FINGERPRINT] + 1  # not the copies the store was built on
        with pytest.warns(UserWarning, match="not in the teacher-logit store") if logits else contextlib.nullcontext():
            losses[name] = module.training_step(batch, 0).item()
    assert module.copy_targets.labelled_live == 1
    assert losses["store"] == pytest.approx(losses["live"], abs=1e-5)


class DumpLiveLabels(pl.Callback):
    """Each rank writes how many batches it trained on and how many of their copies the teacher labelled."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.batches = 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.batches += 1

    def on_train_end(self, trainer, module) -> None:
        counts = {"batches": self.batches, "labelled_live": module.copy_targets.labelled_live}
        (self.folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(counts))


@pytest.mark.distributed
def test_two_rank_training_reads_every_copy_from_the_store(data_with_copies, tmp_path: Path) -> None:
    datamodule, teacher = data_with_copies
    store = precompute_teacher_logits(teacher, datamodule, str(tmp_path / "cache"), epochs=2, replicas=2)
    student = AutoModelForSequenceClassification.from_pretrained(teacher.name_or_path)
    module = DistillationModule(student, teacher, 2, 2.0, 0.5, torch.optim.AdamW, teacher_logits=store)
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        strategy="ddp_spawn",
        devices=2,
        use_distributed_sampler=False,  # the datamodule's loaders shard themselves, as conf/trainer/ddp*.yaml set
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[DumpLiveLabels(tmp_path)],
    )
    trainer.fit(module, datamodule=datamodule)
    counts = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert counts == [{"batches": 12, "labelled_live": 0}] * 2  # 2 epochs of 6 of the 12 batches each
