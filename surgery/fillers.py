"""Caffe's fillers in numpy, always driven by an explicit ``np.random.Generator``.

Semantics follow Caffe's ``filler.hpp``: constant (value 0 by default -- a new learnable layer
left at the default starts at zero), uniform, gaussian (with ``sparse``), positive_unitball,
xavier and msra (variance_norm FAN_IN default, FAN_OUT, AVERAGE; fan_in = count / shape[0],
fan_out = count / shape[1]) and bilinear.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import NetError
from .layers import WEIGHT_BIAS_TYPES, bn_layout
from .net import Layer

__all__ = ["fill", "layer_fillers", "fill_layer", "FILLER_TYPES", "DEFAULT_SEED"]

DEFAULT_SEED = 20240601  # reported by every verb that draws random values
FILLER_TYPES = (
    "constant",
    "uniform",
    "gaussian",
    "positive_unitball",
    "xavier",
    "msra",
    "bilinear",
)


def _fans(shape: tuple[int, ...]) -> tuple[float, float]:
    count = int(np.prod(shape)) if shape else 1
    fan_in = count / shape[0] if shape and shape[0] else float(count)
    fan_out = count / shape[1] if len(shape) > 1 and shape[1] else float(count)
    return fan_in, fan_out


def _norm(filler: dict[str, Any], shape: tuple[int, ...]) -> float:
    fan_in, fan_out = _fans(shape)
    mode = filler.get("variance_norm", "FAN_IN")
    if mode == "FAN_OUT":
        return fan_out
    if mode == "AVERAGE":
        return (fan_in + fan_out) / 2.0
    return fan_in


def fill(
    filler: dict[str, Any] | None, shape: Sequence[int], rng: np.random.Generator
) -> np.ndarray:
    """Values for a blob of ``shape`` drawn as Caffe's filler ``filler`` would.

    Args:
        filler: a ``FillerParameter`` as a dict (``{"type": "xavier"}``); None = constant 0.
        shape: the blob shape.
        rng: the random generator (seeded by the caller, reported in its report).

    Returns:
        A read-only float32 array.

    Raises:
        NetError: unknown filler type or a filler that cannot fill this shape.
    """
    f = dict(filler or {})
    kind = f.get("type", "constant")
    shape = tuple(int(d) for d in shape)
    from ._inputs import check_alloc

    # The float64 draw is made before the float32 copy: 12 bytes per value at the peak.
    check_alloc(12 * math.prod(shape), f"a {kind} filler for a blob of shape {shape}")
    if kind == "constant":
        out = np.full(shape, f.get("value", 0.0), np.float32)
    elif kind == "uniform":
        out = rng.uniform(f.get("min", 0.0), f.get("max", 1.0), shape).astype(np.float32)
    elif kind == "gaussian":
        out = rng.normal(f.get("mean", 0.0), f.get("std", 1.0), shape).astype(np.float32)
        sparse = f.get("sparse", -1)
        if sparse >= 0:
            if len(shape) < 2:
                raise NetError("gaussian filler with sparse needs a blob of 2+ axes")
            p = min(1.0, sparse / shape[0])
            out *= (rng.random(shape) < p).astype(np.float32)
    elif kind == "positive_unitball":
        out = rng.random(shape).astype(np.float32)
        rows = out.reshape(shape[0], -1) if shape else out.reshape(1, -1)
        rows /= rows.sum(axis=1, keepdims=True)
        out = rows.reshape(shape)
    elif kind == "xavier":
        scale = math.sqrt(3.0 / _norm(f, shape))
        out = rng.uniform(-scale, scale, shape).astype(np.float32)
    elif kind == "msra":
        std = math.sqrt(2.0 / _norm(f, shape))
        out = rng.normal(0.0, std, shape).astype(np.float32)
    elif kind == "bilinear":
        if len(shape) != 4 or shape[2] != shape[3]:
            raise NetError(f"bilinear filler needs a 4-D blob with square kernel, got {shape}")
        k = shape[3]
        factor = math.ceil(k / 2)
        c = (2 * factor - 1 - factor % 2) / (2.0 * factor)
        og = np.arange(k, dtype=np.float64)
        w1 = 1 - np.abs(og / factor - c)
        kernel = np.outer(w1, w1).astype(np.float32)
        out = np.broadcast_to(kernel, shape).astype(np.float32)
    else:
        raise NetError(f"unknown filler type {kind!r}; use one of {', '.join(FILLER_TYPES)}")
    out.setflags(write=False)
    return out


# The filler Caffe uses for each learnable blob when the definition sets none.
_CONST0 = {"type": "constant", "value": 0.0}
_CONST1 = {"type": "constant", "value": 1.0}


def layer_fillers(layer: Layer) -> list[dict[str, Any]]:
    """The filler of each learnable blob of ``layer``, as Caffe would apply it."""
    a = layer.attrs
    t = layer.type
    if t in WEIGHT_BIAS_TYPES:
        return [a.get("weight_filler", _CONST0), a.get("bias_filler", _CONST0)]
    if t == "Scale":
        return [a.get("filler", _CONST1), a.get("bias_filler", _CONST0)]
    if t == "Bias":
        return [a.get("filler", _CONST0)]
    if t == "PReLU":
        return [a.get("filler", {"type": "constant", "value": 0.25})]
    if t == "Normalize":
        return [a.get("scale_filler", _CONST1)]
    if t == "BatchNorm":
        return [_CONST0, _CONST0, _CONST0]
    if t == "BN":
        # The forks fill slope/scale and bias/shift from bn_param's fillers (an unset filler
        # is Caffe's constant 0); PSPNet sets the moving mean to 0 and the moving variance
        # to 1 when frozen, else 0 (bn_layer.cpp LayerSetUp).
        if bn_layout(layer) == "segnet":
            return [a.get("scale_filler", _CONST0), a.get("shift_filler", _CONST0)]
        var = _CONST1 if a.get("frozen", False) else _CONST0
        return [a.get("slope_filler", _CONST0), a.get("bias_filler", _CONST0), _CONST0, var]
    return []


def fill_layer(
    layer: Layer, shapes: Sequence[Sequence[int]], rng: np.random.Generator
) -> list[np.ndarray]:
    """Fresh values for every learnable blob of ``layer`` from its fillers."""
    fillers = layer_fillers(layer)
    return [
        fill(fillers[i] if i < len(fillers) else None, shape, rng) for i, shape in enumerate(shapes)
    ]
