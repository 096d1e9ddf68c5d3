"""caffe-surgery: model surgery on Caffe networks.

Load a ``.prototxt`` (any Caffe format) and a ``.caffemodel`` into one editable :class:`Net`,
edit it (rename heads, freeze, insert layers, transplant weights), write files Caffe accepts,
and export to ONNX or PyTorch.

Heavy modules (ops, export) are imported lazily so ``import surgery`` stays fast.
"""

from __future__ import annotations

from typing import Any

from .errors import (
    LayerNotFoundError,
    NetError,
    ParseError,
    ShapeMismatchError,
    SurgeryError,
    UnsupportedLayerError,
)
from .net import Layer, Net, NetState, Param, Rule

__version__ = "0.1.0"

__all__ = [
    "load",
    "save",
    "Net",
    "Layer",
    "Param",
    "Rule",
    "NetState",
    "resolve",
    "check",
    "ops",
    "export",
    "SurgeryError",
    "ParseError",
    "NetError",
    "LayerNotFoundError",
    "ShapeMismatchError",
    "UnsupportedLayerError",
]


def load(prototxt: Any, weights: Any = None, **kw: Any) -> Net:
    """Read a definition and optional weights; see :func:`surgery.caffe_io.load`."""
    from .caffe_io import load as _load

    return _load(prototxt, weights, **kw)


def save(net: Net, prototxt: Any = None, weights: Any = None, **kw: Any) -> None:
    """Write a definition and/or weights atomically; see :func:`surgery.caffe_io.save`."""
    from .caffe_io import save as _save

    _save(net, prototxt, weights, **kw)


def __getattr__(name: str) -> Any:
    import importlib

    if name in ("ops", "export"):
        return importlib.import_module(f".{name}", __name__)
    if name == "resolve":
        from .dataflow import resolve

        return resolve
    if name == "check":
        from .check import check

        return check
    raise AttributeError(f"module 'surgery' has no attribute {name!r}")
