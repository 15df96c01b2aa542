"""The frozen teacher's memo of evaluation answers, in memory and across runs."""

from __future__ import annotations

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
