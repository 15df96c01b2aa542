"""The frozen teacher as the distillation module holds it: outside the module tree, so it is never
in ``parameters()``, the optimizer, checkpoints or saved hyperparameters."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from transformers.utils import ModelOutput


class FrozenTeacher:
    """Wraps the teacher: eval mode, no grad, follows the device of its inputs."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model.eval().requires_grad_(False)
        self._memo: dict[bytes, Tensor] = {}

    @torch.no_grad()
    def __call__(self, inputs: dict[str, Tensor], output_hidden_states: bool = False) -> ModelOutput:
        self._follow(inputs)
        return self.model(**inputs, output_hidden_states=output_hidden_states)

    def _follow(self, inputs: dict[str, Tensor]) -> None:
        device = next(iter(inputs.values())).device
        if next(self.model.parameters()).device != device:
            self.model.to(device)

    @torch.no_grad()
    def last_hidden_state(self, inputs: dict[str, Tensor]) -> Tensor:
        """The base model's final hidden states (after its last norm), without the output head."""
        self._follow(inputs)
        return self.model.base_model(**inputs).last_hidden_state

    def output_head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    def predictions(self, inputs: dict[str, Tensor]) -> Tensor:
        """Predicted classes (see :meth:`memoized`)."""
        return self.memoized(inputs, lambda out: out.logits.argmax(dim=-1))

    def memoized(self, inputs: dict[str, Tensor], reduce: Callable[[ModelOutput], Tensor]) -> Tensor:
        """``reduce(teacher(inputs))``, memoised by the exact inputs: a frozen teacher's answer never
        changes, and every validation check sends it the same batches again."""
        key = b"".join(
            name.encode() + str(tuple(value.shape)).encode() + value.cpu().numpy().tobytes()
            for name, value in sorted(inputs.items())
        )
        if key not in self._memo:
            self._memo[key] = reduce(self(inputs)).cpu()
        return self._memo[key].to(next(iter(inputs.values())).device)
