"""Distributed strategies that need Python objects a YAML file cannot name directly."""

from __future__ import annotations

from typing import Any

import transformers
from lightning.pytorch.strategies import FSDPStrategy


def fsdp(layer_classes: list[str], **settings: Any) -> FSDPStrategy:
    """Lightning's FSDP with each listed ``transformers`` layer class (e.g. ``LlamaDecoderLayer``) as one
    sharding unit; ``settings`` go to :class:`~lightning.pytorch.strategies.FSDPStrategy`."""
    classes = set()
    for name in layer_classes:
        found = next((getattr(module, name) for module in _model_modules(name) if hasattr(module, name)), None)
        if found is None:
            raise ValueError(f"trainer.strategy.layer_classes: {name!r} is not a transformers layer class")
        classes.add(found)
    return FSDPStrategy(auto_wrap_policy=classes, **settings)


def _model_modules(class_name: str) -> list[Any]:
    """The ``transformers.models.<family>.modeling_<family>`` modules that may define ``class_name``."""
    import importlib

    family = class_name.removesuffix("DecoderLayer").removesuffix("Layer").lower()
    modules = []
    for candidate in (family, family.replace("_", "")):
        try:
            modules.append(importlib.import_module(f"transformers.models.{candidate}.modeling_{candidate}"))
        except ImportError:
            continue
    return modules or [transformers]
