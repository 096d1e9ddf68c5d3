"""Exports of a :class:`~surgery.net.Net` to PyTorch and ONNX, numerically equal to Caffe.

Imported lazily: ``import surgery.export`` pulls neither torch nor onnx until a function is used.

* :func:`to_torch`, :func:`save_torch`, :func:`run_blobs` -- :mod:`surgery.export.torch` (a
  ``torch.fx.GraphModule`` built directly, no tracing).
* :func:`param_groups`, :func:`set_trainable`, :func:`freeze_bn`, :func:`trainable_count` --
  :mod:`surgery.export.finetune` (training the exported module in PyTorch).
* :func:`to_caffemodel`, :func:`weights_from_torch`, :func:`read_torch_dir` --
  :mod:`surgery.export.caffemodel` (trained PyTorch weights back to a caffemodel).
* :func:`to_onnx` and friends -- :mod:`surgery.export.onnx`.
* :func:`preprocess_spec`, :class:`PreprocessSpec` -- :mod:`surgery.export.preprocess` (the
  steps from RGB images to a net input, carried into both exports).
* :mod:`surgery.export.common` -- the lowering facts both exporters share.
* :mod:`surgery.export.reference` -- a small numpy reference of the tricky layer semantics.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "to_torch": "torch",
    "save_torch": "torch",
    "param_groups": "finetune",
    "set_trainable": "finetune",
    "freeze_bn": "finetune",
    "trainable_count": "finetune",
    "to_caffemodel": "caffemodel",
    "weights_from_torch": "caffemodel",
    "read_torch_dir": "caffemodel",
    "run_blobs": "torch",
    "torch_supported_types": "torch",
    "to_onnx": "onnx",
    "save_onnx": "onnx",
    "preprocess_spec": "preprocess",
    "PreprocessSpec": "preprocess",
    "plan": "common",
    "ExportPlan": "common",
}

__all__ = list(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module 'surgery.export' has no attribute {name!r}")
