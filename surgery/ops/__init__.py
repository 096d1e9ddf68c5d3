"""Surgery operations: functions over a :class:`~surgery.net.Net` that return a new net and a
:class:`Report`. The input net is never modified; untouched layers share their weight arrays.

The functions are imported here (none of the op modules imports torch or onnx), so
``surgery.ops.transplant`` is always the function, never the submodule of the same name.
"""

from __future__ import annotations

from .cut import cut
from .deploy import fc_to_conv, to_deploy
from .heads import find_heads, rename_heads
from .init import init_weights
from .insert import insert_eltwise, insert_gate
from .lr import freeze, set_lr, unfreeze
from .recipe import apply_recipe, load_recipe
from .report import Report
from .transplant import transplant, transplant_file

__all__ = [
    "Report",
    "find_heads",
    "rename_heads",
    "freeze",
    "unfreeze",
    "set_lr",
    "insert_eltwise",
    "insert_gate",
    "cut",
    "init_weights",
    "transplant",
    "transplant_file",
    "to_deploy",
    "fc_to_conv",
    "apply_recipe",
    "load_recipe",
]
