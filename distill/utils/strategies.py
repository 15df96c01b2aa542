"""Distributed strategies that need Python objects a YAML file cannot name directly."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import ModelParallelStrategy


def fsdp(devices: int | str, num_nodes: int | str = 1, **settings: Any) -> ModelParallelStrategy:
    """Fully sharded data parallel over all ``devices * num_nodes`` ranks: Lightning's ModelParallelStrategy
    (torch's FSDP2) with one data-parallel dimension. The module shards its models itself in
    ``configure_model`` (:mod:`distill.utils.sharding`). Checkpoints are saved whole, so a student
    checkpoint loads without FSDP; ``settings`` go to the strategy."""
    ranks = _count(devices, "trainer.devices") * _count(num_nodes, "trainer.num_nodes")
    settings.setdefault("save_distributed_checkpoint", False)
    return ModelParallelStrategy(data_parallel_size=ranks, tensor_parallel_size=1, **settings)


def _count(value: int | str, name: str) -> int:
    # SLURM hands these over as environment strings; "auto" or a device list cannot size the mesh.
    if str(value).isdigit() and int(value) > 0:
        return int(value)
    raise ValueError(f"{name}={value!r}: trainer=fsdp needs a positive number of ranks to size its device mesh")
