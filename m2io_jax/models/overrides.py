"""Run-time fields of a model config that a checkpoint does not hold, set by dotted name.

Below both the checkpoint dispatcher (`registry.py`) and the per-model checkpoint layouts, which all use it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any


def override_fields(config: Any, overrides: Mapping[str, Any] | None, where: str) -> Any:
    """`config` (a frozen dataclass) with fields replaced; a dotted name reaches a nested config ("vision.remat").

    Raises naming the key and the fields that exist when a name is not a field.
    """
    for key, value in (overrides or {}).items():
        config = _replace_path(config, key.split("."), value, key, where)
    return config


def _replace_path(config: Any, parts: Sequence[str], value: Any, key: str, where: str) -> Any:
    fields = [f.name for f in dataclasses.fields(config)] if dataclasses.is_dataclass(config) else []
    if parts[0] not in fields:
        raise KeyError(f"{where}: override {key!r}: {type(config).__name__} has no field {parts[0]!r} "
                       f"(fields: {', '.join(fields) or 'none'})")
    if len(parts) > 1:
        value = _replace_path(getattr(config, parts[0]), parts[1:], value, key, where)
    return dataclasses.replace(config, **{parts[0]: value})
