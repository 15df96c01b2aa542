"""The process's random streams as checkpoint values, one set per data-parallel rank.

Dropout, HF ``generate``'s sampling (on-policy responses) and anything else that draws from torch's, numpy's or
Python's global generators continues exactly after a resume only if those generators are where the
interrupted run left them. Ranks draw different amounts (their batches differ), so each rank has its own
streams; Lightning writes checkpoints from rank 0 only, so every rank's streams are gathered into it.
Values are tensors, ints, floats and strings, which ``torch.load(weights_only=True)`` accepts.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


def capture() -> dict[str, Any]:
    """This process's global generators: torch (CPU, and CUDA once initialised), numpy and Python."""
    kind, key, position, has_gauss, gauss = np.random.get_state(legacy=True)
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (kind, torch.from_numpy(key.astype(np.int64)), position, has_gauss, gauss),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore(state: dict[str, Any]) -> None:
    """Sets the generators :func:`capture` read."""
    torch.set_rng_state(state["torch"])
    kind, key, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), position, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def data_parallel_group() -> tuple[int, int]:
    """(rank, number of ranks) of this process; (0, 1) outside ``torch.distributed``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gathered(state: Any) -> list[Any]:
    """Every rank's ``state``, in rank order (collective: every rank calls it, as every rank saves)."""
    _, ranks = data_parallel_group()
    if ranks == 1:
        return [state]
    states: list[Any] = [None] * ranks
    dist.all_gather_object(states, state)
    return states


def this_ranks(states: list[Any], what: str) -> Any:
    """This rank's entry of :func:`gathered` ``states``; refuses states saved by another number of ranks."""
    rank, ranks = data_parallel_group()
    if len(states) != ranks:
        raise ValueError(
            f"{what} was saved by {len(states)} data-parallel ranks and this run has world_size={ranks}:"
            f" resume at {len(states)} ranks (trainer.devices x trainer.num_nodes) for an exact continuation"
        )
    return states[rank]
