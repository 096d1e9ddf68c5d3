"""Surgery operations: functions over a :class:`~surgery.net.Net` that return a new net and a
:class:`Report`. The input net is never modified; untouched layers share their weight arrays.

Imported lazily so that ``import surgery.ops`` does not pull every op module.
"""

from __future__ import annotations

import importlib
from typing import Any

from .report import Report

_WHERE = {
    "find_heads": "heads",
    "rename_heads": "heads",
    "freeze": "lr",
    "unfreeze": "lr",
    "set_lr": "lr",
    "insert_eltwise": "insert",
    "insert_gate": "insert",
    "transplant": "transplant",
    "transplant_file": "transplant",
    "to_deploy": "deploy",
    "fc_to_conv": "deploy",
    "apply_recipe": "recipe",
    "load_recipe": "recipe",
}

__all__ = ["Report", *_WHERE]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
        # cache it: importing a submodule binds its name here (ops.transplant the module would
        # shadow ops.transplant the function)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'surgery.ops' has no attribute {name!r}")
