"""The frozen teacher's memo of evaluation answers, in memory and across runs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from distill.modules.frozen_teacher import FrozenTeacher
from distill.train import train


class Counting(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.calls = 0

    def forward(self, x, output_hidden_states=False):
        self.calls += 1
        return type("Out", (), {"logits": self.linear(x.float())})()


def test_memo_persists_and_is_keyed_by_inputs_and_name(tmp_path: Path) -> None:
    memo, model = tmp_path / "memo.pt", Counting()
    first = FrozenTeacher(model, memo)
    inputs = {"x": torch.arange(6).reshape(2, 3)}
    predictions = first.predictions(inputs)
    first.predictions(inputs)
    sums = first.memoized(inputs, lambda out: out.logits.sum(-1), "sums")
    assert model.calls == 2  # once per name, not per call
    first.save_memo()
    second_model = Counting()
    second = FrozenTeacher(second_model, memo)
    assert torch.equal(second.predictions(inputs), predictions)
    assert torch.equal(second.memoized(inputs, lambda out: out.logits.sum(-1), "sums"), sums)
    assert second_model.calls == 0
    second.predictions({"x": torch.ones(2, 3, dtype=torch.long)})
    assert second_model.calls == 1


def test_key_tensors_part_the_memo_and_plain_keys_stay_as_memo_files_have_them(tmp_path: Path) -> None:
    """An answer that reads other tensors (labels) is memoised per value of them; keys without such
    tensors are the ones memo files were written with, so those files stay valid."""
    model, inputs = Counting(), {"x": torch.arange(6).reshape(2, 3)}
    teacher = FrozenTeacher(model)
    masked = [
        teacher.memoized(inputs, lambda out, k=k: out.logits[:, k], "column", {"k": torch.tensor(k)}) for k in (0, 1)
    ]
    assert model.calls == 2 and not torch.equal(masked[0], masked[1])
    value = inputs["x"]
    written_before = hashlib.sha256(b"predictions")  # the key as memo files hold it
    written_before.update(b"x" + str(tuple(value.shape)).encode() + value.numpy().tobytes())
    memo = tmp_path / "memo.pt"
    torch.save({written_before.hexdigest(): torch.tensor([7, 7])}, memo)
    assert torch.equal(FrozenTeacher(Counting(), memo).predictions(inputs), torch.tensor([7, 7]))


class TiedHead(nn.Module):
    """Input embedding and output head share one weight, as in most causal LMs."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.head = nn.Linear(4, 7, bias=False)
        self.head.weight = self.embed.weight
        self.calls = 0

    def forward(self, x, output_hidden_states=False):
        self.calls += 1
        return type("Out", (), {"logits": self.head(self.embed(x))})()


def test_release_frees_the_weights_and_the_next_use_reads_them_back_tied(tmp_path: Path) -> None:
    model, inputs = TiedHead(), {"x": torch.arange(6).reshape(2, 3)}
    teacher = FrozenTeacher(model, tmp_path / "teacher_eval" / "memo.pt")
    before, predictions = teacher(inputs).logits, teacher.predictions(inputs)
    teacher.release()
    assert teacher.released and sum(p.numel() for p in model.parameters()) == 0
    assert torch.equal(teacher.predictions(inputs), predictions) and teacher.released  # the memo answers
    assert torch.equal(teacher(inputs).logits, before) and not teacher.released
    assert model.head.weight is model.embed.weight and not model.embed.weight.requires_grad
    teacher.release()
    teacher.release()  # twice is once
    teacher.read_back()
    assert torch.equal(teacher.model(**inputs).logits, before)
    assert not list((tmp_path / "teacher_eval").iterdir())  # the scratch file has no name


class RecordTeacherState(pl.Callback):
    """Writes whether the teacher's weights were in memory at each training step and after fit."""

    def __init__(self, path: str) -> None:
        self.path, self.steps = Path(path), []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.steps.append(module.teacher.released)

    def on_fit_end(self, trainer, module) -> None:
        self.path.write_text(json.dumps({"steps": self.steps, "after_fit": module.teacher.released}))


@pytest.mark.slow
@pytest.mark.parametrize(("cache", "released"), [("precompute", True), ("none", False)])
def test_fit_frees_the_teacher_only_when_every_target_is_stored(
    compose_train, tiny_run_overrides, tmp_path: Path, cache: str, released: bool
) -> None:
    record = tmp_path / "teacher_state.json"
    recorder = [
        f"+callbacks.teacher_state._target_={__name__}.RecordTeacherState",
        f"+callbacks.teacher_state.path={record}",
    ]
    metrics = train(compose_train(*tiny_run_overrides, f"distill.teacher_cache={cache}", *recorder))
    state = json.loads(record.read_text())
    assert state == {"steps": [released] * 6, "after_fit": False}
    assert 0 <= metrics["teacher/val_acc"] <= 1  # tested after fit, the weights read back
