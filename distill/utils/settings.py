"""Nested settings as constructors take them: a settings dataclass, or the mapping Hydra passes for it.

A constructor with a group of related settings (the teacher's ``finetune_settings``, GLUE's
``augment``, the prompt pool's ``generation``, ...) types that argument as the group's dataclass,
which holds the defaults and range checks; :func:`distill.config.schemas.schema_of` turns the
argument into a nested config node with those defaults. Hydra hands the node over as a
``DictConfig``; :func:`settings_of` makes it the dataclass again, so the checks run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

Settings = TypeVar("Settings")


def settings_of(kind: type[Settings], value: Settings | Mapping[str, Any] | None) -> Settings:
    """``value`` as the dataclass ``kind``: an instance as it is, a mapping as its fields, ``None`` as the defaults."""
    if value is None:
        return kind()
    if isinstance(value, kind):
        return value
    return kind(**value)
