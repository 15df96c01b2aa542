"""Where a model runs, and its inputs moved there: for the code that runs models outside Lightning."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter; the CPU for a model with none (an ONNX Runtime session)."""
    parameter = next(model.parameters(), None) if isinstance(model, nn.Module) else None
    return parameter.device if parameter is not None else torch.device("cpu")


def to_device(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {name: value.to(device) if isinstance(value, Tensor) else value for name, value in batch.items()}


@contextlib.contextmanager
def on_gpu_if_any(model: nn.Module) -> Iterator[torch.device]:
    """``model`` on the current CUDA device for the block, if there is one, and back where it was after:
    for passes outside Lightning that a GPU does in seconds and a CPU in minutes (the teacher's store)."""
    home = model_device(model)
    target = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else home
    model.to(target)
    try:
        yield target
    finally:
        model.to(home)
