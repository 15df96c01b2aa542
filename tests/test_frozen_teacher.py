"""The frozen teacher's memo of evaluation answers, in memory and across runs."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from distill.modules.frozen_teacher import FrozenTeacher


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
