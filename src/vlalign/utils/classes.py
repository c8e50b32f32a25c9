"""Classes named by ``class_path`` strings, as configs and checkpoints name them."""

from __future__ import annotations

import importlib


def resolve_class(class_path: object) -> type | None:
    """The class ``"package.module.Name"`` names, or None when it is not a dotted path to an importable class."""
    if not isinstance(class_path, str) or "." not in class_path:
        return None
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None
    return cls if isinstance(cls, type) else None
