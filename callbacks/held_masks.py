"""Hold masks computed before training: distil a one-shot pruned student with its zeros kept.

``python -m distill.prune`` saves the pruned model with ``sparsity_masks.safetensors`` (parameter
name -> bool, True = kept). With ``student=pretrained`` pointing at that folder and
``compression=hold_masks``, this callback reads the file and holds exactly those masks through
``fit`` (weights, gradients and optimizer state, as every masking callback does): the masks are the
pruner's (SparseGPT's, Wanda's), never recomputed by magnitude. Resumed runs restore the masks from
the checkpoint like the other masking callbacks.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from safetensors.torch import load_file
from torch import Tensor

from distill.callbacks.masking import MaskingCallback, check_masks_fit


def read_masks(path: str | Path, prefix: str = "") -> dict[str, Tensor]:
    """The masks of a ``sparsity_masks.safetensors`` file, their names prefixed with ``prefix``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"masks_file {str(path)!r} does not exist: point it at the sparsity_masks.safetensors that "
            "python -m distill.prune saved beside the pruned model"
        )
    return {f"{prefix}{name}": mask.bool() for name, mask in load_file(str(path)).items()}


class HeldMasks(MaskingCallback):
    def __init__(
        self, masks_file: str, prefix: str = "student.", include: Sequence[str] | None = None, **settings: Any
    ) -> None:
        super().__init__(include=include, **settings)
        self.masks_file, self.prefix = masks_file, prefix
        self.saved_masks: dict[str, Tensor] = {}

    def select_targets(self, pl_module: pl.LightningModule, names: list[str]) -> list[str]:
        """The targeted layers that the file has masks for; a mask for a missing or reshaped layer is an error."""
        self.saved_masks = read_masks(self.masks_file, self.prefix)
        check_masks_fit(pl_module, self.saved_masks, str(self.masks_file))
        chosen = [name for name in names if name in self.saved_masks]
        if not chosen:
            raise ValueError(
                f"none of the {len(self.saved_masks)} masks in {self.masks_file} is for a targeted layer "
                f"(include={self.include}, e.g. {names[:3]})"
            )
        return chosen

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.masks:  # a fresh fit; a resumed one restored its masks from the checkpoint
            self.set_masks(trainer, pl_module, {name: self.saved_masks[name] for name in self.targets})
        super().on_fit_start(trainer, pl_module)

    def describe(self) -> dict[str, Any]:
        """For the export manifest."""
        kept = sum(int(mask.sum()) for mask in self.masks.values())
        total = sum(mask.numel() for mask in self.masks.values())
        return {"masks_file": str(self.masks_file), "layers": sorted(self.masks), "sparsity": 1 - kept / max(total, 1)}
