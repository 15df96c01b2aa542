"""The frozen teacher as the distillation module holds it: outside the module tree, so it is never
in ``parameters()``, the optimizer, checkpoints or saved hyperparameters."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.utils import ModelOutput


class FrozenTeacher:
    """Wraps the teacher: eval mode, no grad, follows the device of its inputs."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model.eval().requires_grad_(False)
        self._predictions: dict[bytes, Tensor] = {}

    @torch.no_grad()
    def __call__(self, inputs: dict[str, Tensor], output_hidden_states: bool = False) -> ModelOutput:
        device = next(iter(inputs.values())).device
        if next(self.model.parameters()).device != device:
            self.model.to(device)
        return self.model(**inputs, output_hidden_states=output_hidden_states)

    def predictions(self, inputs: dict[str, Tensor]) -> Tensor:
        """Predicted classes, memoised by the exact inputs: a frozen teacher's answer never changes,
        and every validation check sends it the same dev batches again."""
        key = b"".join(
            name.encode() + str(tuple(value.shape)).encode() + value.cpu().numpy().tobytes()
            for name, value in sorted(inputs.items())
        )
        if key not in self._predictions:
            self._predictions[key] = self(inputs).logits.argmax(dim=-1).cpu()
        return self._predictions[key].to(next(iter(inputs.values())).device)
