"""Fully sharded data parallel (torch's FSDP2, ``fully_shard``) for the student and the frozen teacher.

Under ``trainer=fsdp`` Lightning's ModelParallelStrategy hands the module a device mesh in
``configure_model``, where each Hugging Face model is cut into one sharding unit per layer its class
names in ``_no_split_modules`` (the layers ``accelerate`` and the HF Trainer wrap), plus one unit for
the rest (embeddings, final norm, head: a tied embedding and LM head stay in one unit). No rank holds
a whole model, the frozen teacher included, so every rank must run every forward of a sharded model
(each unit all-gathers its weights): memoised teacher answers and generation keep to that.

FSDP2 runs on CPU processes over gloo, so the sharded path runs and is tested without GPUs
(``trainer=fsdp_cpu``).
"""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor


def shard(model: nn.Module, mesh: DeviceMesh) -> None:
    """Shard ``model`` in place over ``mesh``: its ``_no_split_modules`` layers one unit each, then the rest."""
    layer_names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [module for module in model.modules() if type(module).__name__ in layer_names and module is not model]
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no layers to shard: it names {sorted(layer_names)} in _no_split_modules"
            " and FSDP needs one sharding unit per layer; use trainer=ddp for this model"
        )
    for layer in reversed(layers):  # nested units are sharded before the units that hold them
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def is_sharded(model: nn.Module | None) -> bool:
    return isinstance(model, FSDPModule)


def whole(tensor: Tensor) -> Tensor:
    """The full tensor of a sharded parameter (a collective), any other tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def plain_class(model: nn.Module) -> type[nn.Module]:
    """The model's own class (sharding swaps in a subclass, ``FSDP<name>``)."""
    return next(cls for cls in type(model).__mro__ if not issubclass(cls, FSDPModule))


def unsharded(model: nn.Module | None) -> nn.Module | None:
    """``model`` whole on global rank 0: itself when it is not sharded. A sharded model's full weights are
    gathered (a collective: every rank calls it) into a plain copy on rank 0's CPU; other ranks get ``None``."""
    if not is_sharded(model):
        return model
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    plain = plain_class(model)._from_config(model.config).to(next(iter(state.values())).dtype)
    plain.load_state_dict(state)
    return plain.eval()
