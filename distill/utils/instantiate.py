"""Instantiate dicts of `_target_` nodes keyed by name (callbacks, loggers, compression)."""

from __future__ import annotations

import logging
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig

log = logging.getLogger(__name__)


def instantiate_named(section: DictConfig | None, group: str) -> list[Any]:
    """One object per entry; an entry set to null is disabled and skipped."""
    objects = []
    for name, node in (section or {}).items():
        if node is None:
            continue
        if not isinstance(node, DictConfig) or "_target_" not in node:
            raise ValueError(f"{group}.{name} must be a config node with a _target_, got {node!r}")
        log.info("Instantiating %s.%s <%s>", group, name, node._target_)
        objects.append(instantiate(node))
    return objects
