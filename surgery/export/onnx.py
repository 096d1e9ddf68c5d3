"""Export a Caffe net to ONNX that computes what Caffe computes, to float32 rounding.

One lowering table: one plain function per Caffe layer type, registered with
:func:`lowering` (registering a type twice is an error). The exporter walks the resolved
dataflow of one phase (:func:`surgery.dataflow.resolve`) in order; before lowering anything it
collects every layer it cannot export and raises one
:class:`~surgery.errors.UnsupportedLayerError` naming them all.

Naming rules (so every intermediate stays comparable with Caffe):

1. A blob's *last* version keeps the Caffe blob name; an earlier version that an in-place
   layer overwrites is called ``<blob>@<producing layer>``.
2. Learnable blobs are initializers called ``<layer>.<blob index>`` (``conv1.0`` the weight,
   ``conv1.1`` the bias); constants a lowering needs are ``<layer>/<what>``.
3. A name taken twice gets a ``__<n>`` suffix (only on collisions Caffe names cannot avoid).

Caffe facts that need care in ONNX, and how they are lowered:

* Pooling rounds up (``ceil``) and then drops a last window that would start in the padding;
  the exact output size is computed here and reached with explicit, possibly asymmetric pads
  and ``ceil_mode=0``. AVE pooling divides by the window clipped to ``H + pad`` (padding counts,
  the overhang past it does not): lowered as ``AveragePool(count_include_pad=0)`` times a
  constant per-position correction ``real / caffe_divisor`` when the two differ.
* Deconvolution uses explicit pads and no ``output_shape``, so the size is exactly
  ``s(i-1) + d(k-1) + 1 - 2p``.
* BatchNorm divides its statistics by blob[2] (0 means 0); Softmax needs opset >= 13 for
  Caffe's per-axis meaning; LRN WITHIN_CHANNEL is composed from Pow/AveragePool/Mul.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..dataflow import Dataflow, Node, Value
from ..errors import NetError, SurgeryError, UnsupportedLayerError
from ..layers import attr
from ..layers import ints as _ints
from ..net import Net
from ..shapes import Shape, ShapeInfo, infer
from .common import (
    PoolGeometry,
    batch_norm_facts,
    bn_facts,
    conv_geometry,
    loss_facts,
    lrn_facts,
    plan,
    pool_ave_divisor,
    pool_geometry,
    pool_output_hw,
    pool_pads,
    prior_boxes,
)
from .preprocess import PreprocessSpec, check_input

__all__ = [
    "to_onnx",
    "save_onnx",
    "lowering",
    "supported_types",
    "run_onnx",
    "providers",
    "MIN_OPSET",
    "MAX_OPSET",
    "EXTERNAL_DATA_THRESHOLD",
]

FLT_MIN = 1.1754943508222875e-38  # Caffe clamps probabilities to it before the log
MIN_OPSET = 13  # Softmax over one axis (Caffe's meaning) needs 13
MAX_OPSET = 21  # the newest opset every onnxruntime >= 1.20 runs
PIXELS = ("rgb255", "rgb01")  # --preprocess: the new input's values
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3 - 64 * 1024**2  # protobuf's 2 GiB limit, with headroom

Lowering = Callable[["_Graph", Node, list[str], list[str]], None]
Check = Callable[["_Graph", Node], "str | None"]


@dataclass
class _Entry:
    fn: Lowering
    check: Check | None


_TABLE: dict[str, _Entry] = {}


def lowering(*types: str, check: Check | None = None) -> Callable[[Lowering], Lowering]:
    """Register the ONNX lowering of one or more Caffe layer types.

    The function receives the graph being built, the dataflow node, the tensor names of its
    bottoms and the tensor names its tops must get. ``check`` (optional) returns a reason when
    a particular configuration of the type cannot be exported, or None.

    Raises:
        ValueError: a type is already registered.
    """

    def deco(fn: Lowering) -> Lowering:
        for t in types:
            if t in _TABLE:
                raise ValueError(f"layer type {t!r} already has an ONNX lowering "
                                 f"({_TABLE[t].fn.__name__})")
            _TABLE[t] = _Entry(fn, check)
        return fn

    return deco


def supported_types() -> frozenset[str]:
    """The Caffe layer types the ONNX table lowers."""
    return frozenset(_TABLE)


# -- the graph under construction --------------------------------------------------------------
@dataclass
class _Graph:
    flow: Dataflow
    info: ShapeInfo
    opset: int
    dynamic_batch: bool
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    inits: list[onnx.TensorProto] = field(default_factory=list)
    taken: set[str] = field(default_factory=set)
    names: dict[int, str] = field(default_factory=dict)  # id(Value) -> tensor name
    weights: dict[tuple[str, int], str] = field(default_factory=dict)
    overrides: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)
    scope: str = ""

    @property
    def phase(self) -> str:
        return self.flow.state.phase

    # names
    def fresh(self, base: str) -> str:
        name, n = base, 1
        while name in self.taken:
            n += 1
            name = f"{base}__{n}"
        self.taken.add(name)
        return name

    def tmp(self, what: str) -> str:
        return self.fresh(f"{self.scope}/{what}")

    # constants
    def const(self, what: str, array: Any, dtype: Any = np.float32) -> str:
        """An initializer named ``<layer>/<what>``."""
        name = self.tmp(what)
        arr = np.array(array, dtype=dtype, order="C")  # keeps 0-d (ascontiguousarray would not)
        self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def ints(self, what: str, values: Sequence[int]) -> str:
        return self.const(what, np.asarray(list(values), dtype=np.int64), np.int64)

    def blob(self, node: Node, index: int) -> np.ndarray:
        """Learnable blob ``index`` of ``node`` as float32 (fold-bn overrides included)."""
        key = (node.layer.name, index)
        if key in self.overrides:
            return self.overrides[key]
        params = node.layer.params
        if index >= len(params) or params[index].data is None:
            raise SurgeryError(f"layer {node.layer.name!r} ({node.layer.type}): learnable blob "
                               f"{index} has no weights; load the caffemodel")
        data = np.asarray(params[index].data, dtype=np.float32)
        want = self.info.params(node)
        if index < len(want) and tuple(data.shape) != tuple(want[index]):
            data = data.reshape(want[index])  # legacy 4-axis blobs (V1 biases: 1x1x1xN)
        return data

    def weight(self, node: Node, index: int, shape: Sequence[int] | None = None) -> str:
        """The initializer ``<layer>.<index>`` (optionally reshaped, then named ``.../r``)."""
        key = (node.layer.name, index)
        data = self.blob(node, index)
        if shape is not None and tuple(data.shape) != tuple(shape):
            data = data.reshape(shape)
            key = (node.layer.name, index * 1000 + len(shape))
            base = f"{node.layer.name}.{index}/r{len(shape)}"
        else:
            base = f"{node.layer.name}.{index}"
        if key not in self.weights:
            name = self.fresh(base)
            self.inits.append(numpy_helper.from_array(np.ascontiguousarray(data), name))
            self.weights[key] = name
        return self.weights[key]

    # nodes
    def op(self, op_type: str, inputs: Sequence[str], out: str | Sequence[str] | None = None,
           n_out: int = 1, **attrs: Any) -> Any:
        """Append one node; returns its output name (or names when several)."""
        if out is None:
            outs = [self.tmp(op_type) for _ in range(n_out)]
        elif isinstance(out, str):
            outs = [out]
        else:
            outs = list(out)
        attrs = {k: v for k, v in attrs.items() if v is not None}
        self.nodes.append(helper.make_node(op_type, list(inputs), outs,
                                           name=self.fresh(f"{self.scope}:{op_type}"), **attrs))
        return outs[0] if len(outs) == 1 else outs

    # shapes
    def bottom_shape(self, node: Node, i: int = 0) -> Shape:
        s = self.info.shape(node.inputs[i])
        if s is None:
            raise SurgeryError(f"layer {node.layer.name!r}: the shape of bottom "
                               f"{node.layer.bottoms[i]!r} is unknown; give --input-shape")
        return s

    def top_shape(self, node: Node, j: int = 0) -> Shape:
        s = self.info.shape(node.outputs[j])
        if s is None:
            raise SurgeryError(f"layer {node.layer.name!r}: the shape of top "
                               f"{node.layer.tops[j]!r} is unknown; give --input-shape")
        return s

    # reductions changed from attribute to input axes in opset 13 (ReduceSum) and 18 (others)
    def reduce(self, op_type: str, x: str, axes: Sequence[int], keepdims: int,
               out: str | None = None) -> str:
        cut = 13 if op_type == "ReduceSum" else 18
        if self.opset >= cut:
            return self.op(op_type, [x, self.ints("axes", axes)], out, keepdims=keepdims)
        return self.op(op_type, [x], out, axes=list(axes), keepdims=keepdims)

    def reshape(self, x: str, target: Sequence[int], out: str | None = None) -> str:
        return self.op("Reshape", [x, self.ints("shape", target)], out)

    def identity(self, x: str, out: str) -> None:
        self.op("Identity", [x], out)


# -- helpers shared by lowerings ---------------------------------------------------------------
def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def ave_pool_correction(geom: PoolGeometry, in_hw: Sequence[int]) -> np.ndarray | None:
    """Per output position ``real elements / Caffe's divisor``; None when all are 1.

    ``AveragePool(count_include_pad=0)`` divides by the real elements of each window; times
    this factor it divides by Caffe's divisor (:func:`~surgery.export.common.pool_ave_divisor`).
    """
    g = geom.resolved(in_hw)
    assert g.kernel is not None
    real = []
    for o, s, k, size, p in zip(pool_output_hw(g, in_hw), g.stride, g.kernel, in_hw, g.pad,
                                strict=True):
        start = np.arange(o) * s - p
        real.append(np.minimum(start + k, size) - np.maximum(start, 0))
    factor = np.outer(real[0], real[1]) / pool_ave_divisor(g, in_hw).astype(np.float64)
    if np.all(factor == 1.0):
        return None
    return factor.astype(np.float32).reshape((1, 1, *factor.shape))


# -- lowerings ---------------------------------------------------------------------------------
def _check_conv(g: _Graph, node: Node) -> str | None:
    if int(attr(node.layer, "axis", 1)) != 1:
        return "axis other than 1"
    return None


def _conv_attrs(g: _Graph, node: Node) -> dict[str, Any]:
    shape = g.bottom_shape(node)
    geom = conv_geometry(node.layer, len(shape) - 2)
    group = geom.group
    weight = g.info.params(node)[0]
    if node.layer.type != "Deconvolution":  # depthwise forks: the group is in the weight shape
        group = shape[1] // weight[1]
    return {"kernel_shape": list(geom.kernel), "pads": list(geom.pad) * 2,
            "strides": list(geom.stride), "dilations": list(geom.dilation), "group": group}


def _conv_inputs(g: _Graph, node: Node) -> list[str]:
    bias = attr(node.layer, "bias_term", True) or (node.layer.name, 1) in g.overrides
    return [g.weight(node, 0)] + ([g.weight(node, 1)] if bias else [])


@lowering("Convolution", "ConvolutionDepthwise", "DepthwiseConvolution", check=_check_conv)
def _convolution(g: _Graph, node: Node, xs: list[str], ys: list[str]) -> None:
    params, attrs = _conv_inputs(g, node), _conv_attrs(g, node)
    for x, y in zip(xs, ys, strict=True):  # Caffe convolves every bottom with the same weights
        g.op("Conv", [x, *params], y, **attrs)


@lowering("Deconvolution", check=_check_conv)
def _deconvolution(g: _Graph, node: Node, xs: list[str], ys: list[str]) -> None:
    # explicit pads, no output_shape: the size is exactly s(i-1) + d(k-1) + 1 - 2p
    params, attrs = _conv_inputs(g, node), _conv_attrs(g, node)
    attrs["output_padding"] = [0] * len(attrs["strides"])
    for x, y in zip(xs, ys, strict=True):
        g.op("ConvTranspose", [x, *params], y, **attrs)


def _check_pool(g: _Graph, node: Node) -> str | None:
    geom = pool_geometry(node.layer)
    if geom.method not in ("MAX", "AVE"):
        return f"pool: {geom.method} (only MAX and AVE are exported)"
    if len(node.layer.tops) > 1:
        return "a second (mask) top"
    return None


@lowering("Pooling", check=_check_pool)
def _pooling(g: _Graph, node: Node, xs: list[str], ys: list[str]) -> None:
    shape = g.bottom_shape(node)
    geom = pool_geometry(node.layer)
    if geom.global_pooling:
        g.op("GlobalMaxPool" if geom.method == "MAX" else "GlobalAveragePool", xs, ys[0])
    else:
        _pool(g, geom, xs[0], ys[0], shape[2:])


def _pool(g: _Graph, geom: PoolGeometry, x: str, y: str, in_hw: Sequence[int]) -> None:
    """Caffe pooling: explicit pads (end pads reach Caffe's size exactly) and floor rounding."""
    top, left, bottom, right = pool_pads(geom, in_hw)
    kernel, stride = list(geom.kernel or ()), list(geom.stride)
    if bottom < 0 or right < 0:  # floor rounding leaves a strip unread: crop it
        h = in_hw[0] + min(bottom, 0)
        w = in_hw[1] + min(right, 0)
        x = g.op("Slice", [x, g.ints("starts", [0, 0]), g.ints("ends", [h, w]),
                           g.ints("axes", [2, 3])])
        bottom, right = max(bottom, 0), max(right, 0)
    pads = [top, left, bottom, right]
    if geom.method == "MAX":
        g.op("MaxPool", [x], y, kernel_shape=kernel, pads=pads, strides=stride)
        return
    corr = ave_pool_correction(geom, in_hw)
    if corr is None:  # every window lies inside the input: each divisor is the kernel area
        g.op("AveragePool", [x], y, kernel_shape=kernel, pads=pads, strides=stride)
        return
    mean = g.op("AveragePool", [x], None, kernel_shape=kernel, pads=pads, strides=stride,
                count_include_pad=0)
    g.op("Mul", [mean, g.const("ave_divisor", corr)], y)


@lowering("InnerProduct")
def _inner_product(g: _Graph, node: Node, xs: list[str], ys: list[str]) -> None:
    lay = node.layer
    shape = g.bottom_shape(node)
    axis = _axis(int(attr(lay, "axis", 1)), len(shape))
    transpose = bool(attr(lay, "transpose", False))
    bias = bool(attr(lay, "bias_term", True))
    w = g.weight(node, 0)
    if axis == 1:
        x = xs[0] if len(shape) == 2 else g.op("Flatten", [xs[0]], axis=1)
        inputs = [x, w] + ([g.weight(node, 1)] if bias else [])
        g.op("Gemm", inputs, ys[0], transB=0 if transpose else 1)
        return
    x = xs[0] if len(shape) == axis + 1 else g.reshape(xs[0], [0] * axis + [-1])
    if not transpose:
        w = g.op("Transpose", [w], perm=[1, 0])
    if bias:
        g.op("Add", [g.op("MatMul", [x, w]), g.weight(node, 1)], ys[0])
    else:
        g.op("MatMul", [x, w], ys[0])


@lowering("ReLU")
def _relu(g: _Graph, node: Node, xs: list[str], ys: list[str]) -> None:
    slope = float(attr(node.layer, "negative_slope", 0.0))
    if slope == 0.0:
        g.op("Relu", xs, ys[0])
    else:
        g.op("LeakyRelu", xs, ys[0], alpha=slope)


def _channel_shape(g: _Graph, node: Node, n: int, axis: int = 1) -> list[int]:
    rank = len(g.bottom_shape(node))
    return [n] + [1] * (rank - axis - 1)


@lowering("PReLU")
def _prelu(g: _Graph, node: Node, xs: list[str], ys: list[str]) -> None:
    slope = g.blob(node, 0)
    shape = [1] if slope.size == 1 else _channel_shape(g, node, slope.size)
    g.op("PRelu", [xs[0], g.weight(node, 0, shape)], ys[0])


@lowering("Sigmoid")
def _sigmoid(g: _Graph, node: Node, xs: list[str], ys: list[str]) -> None:
    g.op("Sigmoid", xs, ys[0])


@lowering("TanH")
def _tanh(g: _Graph, node: Node, xs: list[str], ys: list[str]) -> None:
    g.op("Tanh", xs, ys[0])


@lowering("ELU")
def _elu(g: _Graph, node: Node, xs: list[str], ys: list[str]) -> None:
    g.op("Elu", xs, ys[0], alpha=float(attr(node.layer, "alpha", 1.0)))


@lowering("AbsVal")
def _absval(g: _Graph, node: Node, xs: list[str], ys: list[str]) -> None:
    g.op("Abs", xs, ys[0])


def _affine(g: _Graph, x: str, scale: float, shift: float) -> str:
    if scale != 1.0:
        x = g.op("Mul", [x, g.const("scale", scale)])
    if shift != 0.0:
        x = g.op("Add", [x, g.const("shift", shift)])
    return x


@lowering("Power")
def _power(g: _Graph, node: Node, xs: list[str], ys: list[str]) -> None:
    lay = node.layer
    power = float(attr(lay, "power", 1.0))
    scale = float(attr(lay, "scale", 1.0))
    shift = float(attr(lay, "shift", 0.0))
    if power == 0.0:  # Caffe: all ones
        zero = g.op("Mul", [xs[0], g.const("zero", 0.0)])
        g.op("Add", [zero, g.const("one", 1.0)], ys[0])
        return
    base = _affine(g, xs[0], scale, shift)
    if power == 1.0:
        g.identity(base, ys[0])
    else:
        g.op("Pow", [base, g.const("power", power)], ys[0])


def _ln_base(node: Node) -> float:
    base = float(attr(node.layer, "base", -1.0))
    return 1.0 if base == -1.0 else math.log(base)


@lowering("Exp")
def _exp(g: _Graph, node: Node, xs: list[str], ys: list[str]) -> None:
    lay = node.layer
    ln = _ln_base(node)
    x = _affine(g, xs[0], float(attr(lay, "scale", 1.0)) * ln, float(attr(lay, "shift", 0.0)) * ln)
    g.op("Exp", [x], ys[0])


@lowering("Log")
def _log(g: _Graph, node: Node, xs: list[str], ys: list[str]) -> None:
    lay = node.layer
    x = _affine(g, xs[0], float(attr(lay, "scale", 1.0)), float(attr(lay, "shift", 0.0)))
    ln = _ln_base(node)
    if ln == 1.0:
        g.op("Log", [x], ys[0])
    else:
        g.op("Mul", [g.op("Log", [x]), g.const("inv_ln_base", 1.0 / ln)], ys[0])


@lowering("BNLL")
def _bnll(g: _Graph, node: Node, xs: list[str], ys: list[str]) -> None:
    g.op("Softplus", xs, ys[0])


@lowering("Threshold")
def _threshold(g: _Graph, node: Node, xs: list[str], ys: list[str]) -> None:
    t = float(attr(node.layer, "threshold", 0.0))
    above = g.op("Greater", [xs[0], g.const("threshold", t)])
    g.op("Cast", [above], ys[0], to=TensorProto.FLOAT)


@lowering("Clip")
def _clip(g: _Graph, node: Node, xs: list[str], ys: list[str]) -> None:
    lo = float(attr(node.layer, "min", 0.0))
    hi = float(attr(node.layer, "max", 0.0))
    g.op("Clip", [xs[0], g.const("min", lo), g.const("max", hi)], ys[0])


@lowering("Swish")
def _swish(g: _Graph, node: Node, xs: list[str], ys: list[str]) -> None:
    beta = float(attr(node.layer, "beta", 1.0))
    x = xs[0] if beta == 1.0 else g.op("Mul", [xs[0], g.const("beta", beta)])
    g.op("Mul", [xs[0], g.op("Sigmoid", [x])], ys[0])


@lowering("BatchNorm")
def _batch_norm(g: _Graph, node: Node, xs: list[str], ys: list[str]) -> None:
    facts = batch_norm_facts(node.layer)
    shape = g.bottom_shape(node)
    c = shape[1] if len(shape) > 1 else 1
    if facts.global_stats(g.phase):
        if facts.mean is None or facts.var is None:
            g.blob(node, 0)  # raises the missing-weights error
        g.op("BatchNormalization",
             [xs[0], g.const("gamma", np.ones(c)), g.const("beta", np.zeros(c)),
              g.const("mean", facts.mean), g.const("var", facts.var)], ys[0],
             epsilon=facts.eps)
        return
    axes = [0] + list(range(2, len(shape)))  # statistics of this batch (use_global_stats false)
    mean = g.reduce("ReduceMean", xs[0], axes, 1)
    centered = g.op("Sub", [xs[0], mean])
    var = g.reduce("ReduceMean", g.op("Mul", [centered, centered]), axes, 1)
    std = g.op("Sqrt", [g.op("Add", [var, g.const("eps", facts.eps)])])
    g.op("Div", [centered, std], ys[0])


def _check_fork_bn(g: _Graph, node: Node) -> str | None:
    try:
        bn_facts(node.layer)
    except UnsupportedLayerError as exc:
        return str(exc)
    return None


@lowering("BN", check=_check_fork_bn)
def _fork_bn(g: _Graph, node: Node, xs: list[str], ys: list[str]) -> None:
    f = bn_facts(node.layer)  # rule 5
    shape = g.bottom_shape(node)
    c = shape[1] if len(shape) > 1 else 1
    bshape = [1, c] + [1] * (len(shape) - 2)
    scale, shift = g.weight(node, 0, bshape), g.weight(node, 1, bshape)
    if f.layout == "segnet" and f.mode == "INFERENCE":
        g.op("Add", [g.op("Mul", [xs[0], scale]), shift], ys[0])
        return
    if f.global_stats(g.phase):
        mean, var = g.weight(node, 2, bshape), g.weight(node, 3, bshape)
    else:  # this batch's statistics
        axes = [0] + list(range(2, len(shape)))
        mean = g.reduce("ReduceMean", xs[0], axes, 1)
        if f.layout == "segnet":  # E(X^2) - E(X)^2
            sq = g.reduce("ReduceMean", g.op("Mul", [xs[0], xs[0]]), axes, 1)
            var = g.op("Sub", [sq, g.op("Mul", [mean, mean])])
        else:
            d = g.op("Sub", [xs[0], mean])
            var = g.reduce("ReduceMean", g.op("Mul", [d, d]), axes, 1)
    inv_std = g.op("Pow", [g.op("Add", [var, g.const("eps", f.eps)]), g.const("pow", -0.5)])
    norm = g.op("Mul", [g.op("Sub", [xs[0], mean]), inv_std])
    g.op("Add", [g.op("Mul", [norm, scale]), shift], ys[0])


def _scale_axes(g: _Graph, node: Node, other: Shape) -> tuple[int, int]:
    """(axis, number of trailing ones) to broadcast a Scale/Bias operand against bottom[0]."""
    shape = g.bottom_shape(node)
    axis = _axis(int(attr(node.layer, "axis", 1)), len(shape))
    return axis, len(shape) - axis - len(other)


def _operand(g: _Graph, node: Node, xs: list[str], blob_index: int) -> str:
    """Bottom[1] when given, else learnable blob ``blob_index``, shaped to broadcast."""
    if len(xs) > 1:
        other = g.bottom_shape(node, 1)
        _, ones = _scale_axes(g, node, other)
        if ones == 0:
            return xs[1]
        return g.reshape(xs[1], [0] * len(other) + [1] * ones)
    data = g.blob(node, blob_index)
    shape = g.bottom_shape(node)
    axis = _axis(int(attr(node.layer, "axis", 1)), len(shape))
    num_axes = int(attr(node.layer, "num_axes", 1))
    end = len(shape) if num_axes == -1 else axis + num_axes
    target = list(shape[axis:end]) + [1] * (len(shape) - end)
    if data.size == 1 and not target:
        target = [1]
    return g.weight(node, blob_index, target)


@lowering("Scale")
def _scale(g: _Graph, node: Node, xs: list[str], ys: list[str]) -> None:
    lay = node.layer
    bias = bool(attr(lay, "bias_term", False))
    scaled_to = ys[0] if not bias else None
    y = g.op("Mul", [xs[0], _operand(g, node, xs, 0)], scaled_to)
    if bias:
        index = 1 if len(xs) == 1 else 0
        data = g.blob(node, index)
        shape = g.bottom_shape(node)
        axis = _axis(int(attr(lay, "axis", 1)), len(shape))
        target = list(data.shape) + [1] * (len(shape) - axis - data.ndim)
        g.op("Add", [y, g.weight(node, index, target)], ys[0])


@lowering("Bias")
def _bias(g: _Graph, node: Node, xs: list[str], ys: list[str]) -> None:
    g.op("Add", [xs[0], _operand(g, node, xs, 0)], ys[0])


def _check_lrn(g: _Graph, node: Node) -> str | None:
    region = str(attr(node.layer, "norm_region", "ACROSS_CHANNELS"))
    if region not in ("ACROSS_CHANNELS", "WITHIN_CHANNEL"):
        return f"norm_region {region}"
    return None


@lowering("LRN", check=_check_lrn)
def _lrn(g: _Graph, node: Node, xs: list[str], ys: list[str]) -> None:
    f = lrn_facts(node.layer)
    if f.region == "ACROSS_CHANNELS":
        g.op("LRN", xs, ys[0], size=f.local_size, alpha=f.alpha, beta=f.beta, bias=f.k)
        return
    # WITHIN_CHANNEL: x / (1 + alpha * avepool_nxn(x^2))^beta with Caffe's AVE pooling
    geom = PoolGeometry("AVE", (f.local_size, f.local_size), (1, 1), (f.pad, f.pad))
    pooled = g.tmp("pooled")
    _pool(g, geom, g.op("Mul", [xs[0], xs[0]]), pooled, g.bottom_shape(node)[2:])
    base = _affine(g, pooled, f.alpha, 1.0)
    g.op("Mul", [xs[0], g.op("Pow", [base, g.const("neg_beta", -f.beta)])], ys[0])


def _check_eltwise(g: _Graph, node: Node) -> str | None:
    op = str(attr(node.layer, "operation", "SUM"))
    if op not in ("SUM", "PROD", "MAX"):
        return f"operation {op}"
    coeff = node.layer.attrs.get("coeff") or []
    if coeff and op != "SUM":
        return "coeff with an operation other than SUM (Caffe refuses it)"
    if coeff and len(coeff) != len(node.layer.bottoms):
        return "coeff needs one value per bottom"
    return None


@lowering("Eltwise", check=_check_eltwise)
def _eltwise(g: _Graph, node: Node, xs: list[str], ys: list[str]) -> None:
    op = str(attr(node.layer, "operation", "SUM"))
    if op == "PROD":
        _chain(g, "Mul", xs, ys[0])
    elif op == "MAX":
        g.op("Max", xs, ys[0])
    else:
        coeff = [float(c) for c in node.layer.attrs.get("coeff") or []] or [1.0] * len(xs)
        terms = [x if c == 1.0 else g.op("Mul", [x, g.const(f"coeff{i}", c)])
                 for i, (x, c) in enumerate(zip(xs, coeff, strict=True))]
        _chain(g, "Add", terms, ys[0])


def _chain(g: _Graph, op: str, xs: list[str], y: str) -> None:
    """Left-to-right binary chain, as Caffe accumulates (Sum/Mul order matters for rounding)."""
    if len(xs) == 1:
        g.identity(xs[0], y)
        return
    acc = xs[0]
    for i, x in enumerate(xs[1:], 1):
        acc = g.op(op, [acc, x], y if i == len(xs) - 1 else None)


def _concat_axis(node: Node, rank: int, legacy: str) -> int:
    lay = node.layer
    if legacy in lay.attrs and "axis" not in lay.attrs:
        return int(lay.attrs[legacy])
    return _axis(int(attr(lay, "axis", 1)), rank)


@lowering("Concat")
def _concat(g: _Graph, node: Node, xs: list[str], ys: list[str]) -> None:
    axis = _concat_axis(node, len(g.bottom_shape(node)), "concat_dim")
    if len(xs) == 1:
        g.identity(xs[0], ys[0])
    else:
        g.op("Concat", xs, ys[0], axis=axis)


@lowering("Slice")
def _slice(g: _Graph, node: Node, xs: list[str], ys: list[str]) -> None:
    shape = g.bottom_shape(node)
    axis = _concat_axis(node, len(shape), "slice_dim")
    sizes = [g.top_shape(node, j)[axis] for j in range(len(ys))]
    if len(ys) == 1:
        g.identity(xs[0], ys[0])
        return
    g.op("Split", [xs[0], g.ints("split", sizes)], ys, axis=axis)


@lowering("Split")
def _split(g: _Graph, node: Node, xs: list[str], ys: list[str]) -> None:
    for y in ys:
        g.identity(xs[0], y)


@lowering("Flatten")
def _flatten(g: _Graph, node: Node, xs: list[str], ys: list[str]) -> None:
    shape = g.bottom_shape(node)
    axis = _axis(int(attr(node.layer, "axis", 1)), len(shape))
    end = _axis(int(attr(node.layer, "end_axis", -1)), len(shape))
    g.reshape(xs[0], [0] * axis + [-1] + list(shape[end + 1:]), ys[0])


@lowering("Reshape")
def _reshape(g: _Graph, node: Node, xs: list[str], ys: list[str]) -> None:
    lay = node.layer
    shape = g.bottom_shape(node)
    spec = lay.attrs.get("shape") or {}
    dims = _ints(spec.get("dim") if isinstance(spec, Mapping) else spec)
    axis = int(attr(lay, "axis", 0))
    axis = axis + len(shape) + 1 if axis < 0 else axis
    num_axes = int(attr(lay, "num_axes", -1))
    end = len(shape) if num_axes == -1 else axis + num_axes
    if axis == 0 and not (g.dynamic_batch and dims[:1] == [0]):
        target = list(g.top_shape(node))  # batch fixed or changed by the reshape: all static
        if g.dynamic_batch and end > 0:
            raise SurgeryError(f"layer {lay.name!r}: a Reshape that rewrites the batch axis "
                               "cannot have a dynamic batch; export without --dynamic-batch")
    else:
        target = [0] * axis + dims + list(shape[end:])  # 0 copies, -1 infers: as in Caffe
    g.reshape(xs[0], target, ys[0])


@lowering("Crop")
def _crop(g: _Graph, node: Node, xs: list[str], ys: list[str]) -> None:
    shape = g.bottom_shape(node)
    ref = g.bottom_shape(node, 1)
    axis = _axis(int(attr(node.layer, "axis", 2)), len(shape))
    offsets = _ints(node.layer.attrs.get("offset"))
    axes = list(range(axis, len(shape)))
    if not offsets:
        offsets = [0] * len(axes)
    elif len(offsets) == 1:
        offsets = offsets * len(axes)
    ends = [o + ref[a] for o, a in zip(offsets, axes, strict=True)]
    g.op("Slice", [xs[0], g.ints("starts", offsets), g.ints("ends", ends),
                   g.ints("axes", axes)], ys[0])


@lowering("Tile")
def _tile(g: _Graph, node: Node, xs: list[str], ys: list[str]) -> None:
    shape = g.bottom_shape(node)
    axis = _axis(int(attr(node.layer, "axis", 1)), len(shape))
    repeats = [1] * len(shape)
    repeats[axis] = int(attr(node.layer, "tiles", 1))
    g.op("Tile", [xs[0], g.ints("repeats", repeats)], ys[0])


@lowering("Softmax")
def _softmax(g: _Graph, node: Node, xs: list[str], ys: list[str]) -> None:
    axis = _axis(int(attr(node.layer, "axis", 1)), len(g.bottom_shape(node)))
    g.op("Softmax", xs, ys[0], axis=axis)


@lowering("Dropout")
def _dropout(g: _Graph, node: Node, xs: list[str], ys: list[str]) -> None:
    # Caffe's Dropout is inverted: identity at TEST unless the fork's scale_train is false
    # (then x * (1 - p)). TRAIN exports are deterministic: no mask is drawn, as at TEST.
    if attr(node.layer, "scale_train", True):
        g.identity(xs[0], ys[0])
    else:
        keep = 1.0 - float(attr(node.layer, "dropout_ratio", 0.5))
        g.op("Mul", [xs[0], g.const("keep", keep)], ys[0])


def _caffe_topk(g: _Graph, x: str, k: int, axis: int, size: int) -> tuple[str, str]:
    """TopK in Caffe's order. Caffe sorts ``(value, index)`` pairs descending, so among equal
    values the higher index comes first; TopK puts the lower one first. So: reverse the axis,
    TopK, and map the indices back (``size - 1 - i``)."""
    rev = g.op("Slice", [x, g.ints("starts", [-1]), g.ints("ends", [-(2**63)]),
                         g.ints("axes", [axis]), g.ints("steps", [-1])])
    values, indices = g.op("TopK", [rev, g.ints("k", [k])], None, n_out=2, axis=axis)
    return values, g.op("Sub", [g.ints("last", [size - 1]), indices])


@lowering("ArgMax")
def _argmax(g: _Graph, node: Node, xs: list[str], ys: list[str]) -> None:
    lay = node.layer
    shape = g.bottom_shape(node)
    top_k = int(attr(lay, "top_k", 1))
    out_max = bool(attr(lay, "out_max_val", False))
    if "axis" in lay.attrs:
        axis = _axis(int(lay.attrs["axis"]), len(shape))
        values, indices = _caffe_topk(g, xs[0], top_k, axis, shape[axis])
        if out_max:
            g.identity(values, ys[0])
        else:
            g.op("Cast", [indices], ys[0], to=TensorProto.FLOAT)
        return
    # no axis: per item, the top_k over everything; top shape (N, 1 or 2, top_k, 1...)
    one = [0, 1, top_k] + [1] * (len(g.top_shape(node)) - 3)
    flat = g.op("Flatten", [xs[0]], axis=1)
    values, indices = _caffe_topk(g, flat, top_k, 1, math.prod(shape[1:]))
    idx = g.op("Cast", [indices], to=TensorProto.FLOAT)
    if out_max:
        g.op("Concat", [g.reshape(idx, one), g.reshape(values, one)], ys[0], axis=1)
    else:
        g.reshape(idx, one, ys[0])


_REDUCE = {"SUM": "ReduceSum", "ASUM": "ReduceL1", "SUMSQ": "ReduceSumSquare",
           "MEAN": "ReduceMean"}


@lowering("Reduction")
def _reduction(g: _Graph, node: Node, xs: list[str], ys: list[str]) -> None:
    lay = node.layer
    shape = g.bottom_shape(node)
    axis = _axis(int(attr(lay, "axis", 0)), len(shape))
    coeff = float(attr(lay, "coeff", 1.0))
    op = _REDUCE[str(attr(lay, "operation", "SUM"))]
    axes = list(range(axis, len(shape)))  # never empty: Caffe needs axis < num_axes
    if coeff == 1.0:
        g.reduce(op, xs[0], axes, 0, ys[0])
    else:
        g.op("Mul", [g.reduce(op, xs[0], axes, 0), g.const("coeff", coeff)], ys[0])


@lowering("MVN")
def _mvn(g: _Graph, node: Node, xs: list[str], ys: list[str]) -> None:
    lay = node.layer
    rank = len(g.bottom_shape(node))
    first = 1 if attr(lay, "across_channels", False) else 2
    axes = list(range(first, rank))
    mean = g.reduce("ReduceMean", xs[0], axes, 1)
    centered = g.op("Sub", [xs[0], mean])
    if not attr(lay, "normalize_variance", True):
        g.identity(centered, ys[0])
        return
    var = g.reduce("ReduceMean", g.op("Mul", [centered, centered]), axes, 1)
    std = g.op("Add", [g.op("Sqrt", [var]), g.const("eps", float(attr(lay, "eps", 1e-9)))])
    g.op("Div", [centered, std], ys[0])


@lowering("Permute")
def _permute(g: _Graph, node: Node, xs: list[str], ys: list[str]) -> None:
    rank = len(g.bottom_shape(node))
    order = _ints(node.layer.attrs.get("order"))
    order += [i for i in range(rank) if i not in order]
    g.op("Transpose", xs, ys[0], perm=order)


@lowering("Normalize")
def _normalize(g: _Graph, node: Node, xs: list[str], ys: list[str]) -> None:
    lay = node.layer
    rank = len(g.bottom_shape(node))
    across = bool(attr(lay, "across_spatial", True))
    axes = list(range(1, rank)) if across else [1]
    eps = float(attr(lay, "eps", 1e-10))
    sumsq = g.reduce("ReduceSumSquare", xs[0], axes, 1)
    norm = g.op("Sqrt", [g.op("Add", [sumsq, g.const("eps", eps)])])
    normed = g.op("Div", [xs[0], norm])
    scale = g.blob(node, 0)
    shape = [1] if scale.size == 1 else _channel_shape(g, node, scale.size)
    g.op("Mul", [normed, g.weight(node, 0, shape)], ys[0])


@lowering("PriorBox")
def _prior_box(g: _Graph, node: Node, xs: list[str], ys: list[str]) -> None:
    # a constant of the shapes only: computed here, stored as an initializer
    boxes = prior_boxes(node.layer, g.bottom_shape(node, 0)[2:], g.bottom_shape(node, 1)[2:])
    g.inits.append(numpy_helper.from_array(boxes, ys[0]))


def _check_upsample(g: _Graph, node: Node) -> str | None:
    if len(node.layer.bottoms) > 1:
        return "the two-bottom (max-unpooling) form"
    shape, top = g.info.shape(node.inputs[0]), g.info.shape(node.outputs[0])
    if shape is not None and top is not None and (top[2] % shape[2] or top[3] % shape[3]):
        return "an output size that is not an integer multiple of the input"
    return None


@lowering("Upsample", check=_check_upsample)
def _upsample(g: _Graph, node: Node, xs: list[str], ys: list[str]) -> None:
    shape, top = g.bottom_shape(node), g.top_shape(node)
    scales = [1.0, 1.0, top[2] / shape[2], top[3] / shape[3]]
    g.op("Resize", [xs[0], "", g.const("scales", scales)], ys[0], mode="nearest",
         coordinate_transformation_mode="asymmetric", nearest_mode="floor")


@lowering("Interp")
def _interp(g: _Graph, node: Node, xs: list[str], ys: list[str]) -> None:
    # DeepLab/PSPNet Interp: crop by the (non-positive) pads, bilinear with aligned corners
    shape, top = g.bottom_shape(node), g.top_shape(node)
    beg, end = int(attr(node.layer, "pad_beg", 0)), int(attr(node.layer, "pad_end", 0))
    x = xs[0]
    if beg or end:
        x = g.op("Slice", [x, g.ints("starts", [-beg, -beg]),
                           g.ints("ends", [shape[2] + end, shape[3] + end]),
                           g.ints("axes", [2, 3])])
    if (shape[2] + beg + end, shape[3] + beg + end) == (top[2], top[3]):
        g.identity(x, ys[0])
        return
    nc = g.op("Slice", [g.op("Shape", [x]), g.ints("nc_start", [0]), g.ints("nc_end", [2])])
    sizes = g.op("Concat", [nc, g.ints("hw", [top[2], top[3]])], axis=0)
    g.op("Resize", [x, "", "", sizes], ys[0], mode="linear",
         coordinate_transformation_mode="align_corners")


@lowering("ShuffleChannel")
def _shuffle_channel(g: _Graph, node: Node, xs: list[str], ys: list[str]) -> None:
    shape = g.bottom_shape(node)
    group = int(attr(node.layer, "group", 1))
    if group == 1:
        g.identity(xs[0], ys[0])
        return
    grouped = g.reshape(xs[0], [0, group, shape[1] // group, -1])
    swapped = g.op("Transpose", [grouped], perm=[0, 2, 1, 3])
    g.reshape(swapped, [0, *shape[1:]], ys[0])


@lowering("Axpy")
def _axpy(g: _Graph, node: Node, xs: list[str], ys: list[str]) -> None:
    # SENet fork: top = a * x + y, a of shape (N, C, 1, 1)
    g.op("Add", [g.op("Mul", [xs[0], xs[1]]), xs[2]], ys[0])


def _normalized(g: _Graph, node: Node, total: str, keep: str | None, outer: int, inner: int,
                y: str) -> None:
    """Divide a summed loss by Caffe's normalizer (VALID counts the kept labels, at least 1)."""
    _, mode = loss_facts(node.layer)
    if mode == "VALID" and keep is not None:
        count = g.op("ReduceSum", [keep], keepdims=0)
        count = g.op("Max", [count, g.const("one", 1.0)])
        g.op("Div", [total, count], y)
        return
    norm = {"FULL": outer * inner, "VALID": outer * inner, "BATCH_SIZE": outer}.get(mode, 1)
    g.op("Div", [total, g.const("normalizer", float(norm))], y)


def _ignore_mask(g: _Graph, label: str, ignore: int | None) -> str | None:
    if ignore is None:
        return None
    same = g.op("Equal", [label, g.const("ignore_label", float(ignore))])
    return g.op("Cast", [g.op("Not", [same])], to=TensorProto.FLOAT)


@lowering("SoftmaxWithLoss")
def _softmax_loss(g: _Graph, node: Node, xs: list[str], ys: list[str]) -> None:
    shape = g.bottom_shape(node)
    axis = _axis(int(attr(node.layer, "axis", 1)), len(shape))
    ignore, _ = loss_facts(node.layer)
    outer, inner = math.prod(shape[:axis]), math.prod(shape[axis + 1:])
    logp = g.op("LogSoftmax", [g.reshape(xs[0], [outer, shape[axis], inner])], axis=1)
    logp = g.op("Max", [logp, g.const("log_flt_min", math.log(FLT_MIN))])
    label = g.reshape(xs[1], [outer, 1, inner])
    keep = _ignore_mask(g, label, ignore)
    index = label if keep is None else g.op("Mul", [label, keep])
    picked = g.op("GatherElements", [logp, g.op("Cast", [index], to=TensorProto.INT64)],
                  axis=1)
    if keep is not None:
        picked = g.op("Mul", [picked, keep])
    total = g.op("Neg", [g.op("ReduceSum", [picked], keepdims=0)])
    _normalized(g, node, total, keep, outer, inner, ys[0])
    if len(ys) > 1:
        g.op("Softmax", [xs[0]], ys[1], axis=axis)


@lowering("EuclideanLoss")
def _euclidean_loss(g: _Graph, node: Node, xs: list[str], ys: list[str]) -> None:
    n = g.bottom_shape(node)[0]
    d = g.op("Sub", [xs[0], g.reshape(xs[1], list(g.bottom_shape(node)))])
    total = g.op("ReduceSum", [g.op("Mul", [d, d])], keepdims=0)
    g.op("Div", [total, g.const("two_n", 2.0 * n)], ys[0])


@lowering("SigmoidCrossEntropyLoss")
def _sigmoid_ce_loss(g: _Graph, node: Node, xs: list[str], ys: list[str]) -> None:
    shape = g.bottom_shape(node)
    ignore, _ = loss_facts(node.layer)
    t = g.reshape(xs[1], list(shape))
    # softplus(x) - x*t == the stable form Caffe writes out
    per = g.op("Sub", [g.op("Softplus", [xs[0]]), g.op("Mul", [xs[0], t])])
    keep = _ignore_mask(g, t, ignore)
    if keep is not None:
        per = g.op("Mul", [per, keep])
    total = g.op("ReduceSum", [per], keepdims=0)
    _normalized(g, node, total, keep, shape[0], math.prod(shape[1:]), ys[0])


# -- the exporter ------------------------------------------------------------------------------
def _check_configs(g: _Graph, nodes: Sequence[Node]) -> None:
    """Every unsupported configuration, then every layer without weights, in one error each."""
    problems: list[str] = []
    missing: list[str] = []
    for node in nodes:
        entry = _TABLE[node.layer.type]
        if entry.check is not None:
            reason = entry.check(g, node)
            if reason:
                problems.append(f"{node.layer.name!r} ({node.layer.type}: {reason})")
        want = len(g.info.params(node))
        have = [p for p in node.layer.params[:want] if p.data is not None]
        if want and len(have) < want:
            missing.append(f"{node.layer.name!r} ({node.layer.type})")
    if problems:
        raise UnsupportedLayerError(
            f"{len(problems)} layer(s) use a configuration the ONNX export does not support: "
            + ", ".join(problems) + ". Change these layers (surgery can edit the net) or "
            "export to torch."
        )
    if missing:
        raise NetError(
            f"{len(missing)} layer(s) have no weights: {', '.join(missing[:20])}"
            + (" ..." if len(missing) > 20 else "")
            + ". Pass the caffemodel (--weights), check that its layer names match the "
            "definition, or draw them from their fillers (--fill-missing)."
        )


def _name_values(g: _Graph, inputs: Sequence[Value], nodes: Sequence[Node],
                 aliases: Mapping[int, Value]) -> None:
    """Naming rule 1: the last version keeps the blob name.

    Graph inputs keep their Caffe names whatever follows (they are what callers feed): an
    input rewritten in place (ShuffleNet's ``data`` -> BatchNorm -> Scale) names its later
    versions ``<blob>@<layer>``, the last one included. A value folded away (``aliases``:
    folded value -> surviving value) lends the surviving tensor the name of the last value of
    its chain.
    """
    values = list(inputs) + [v for n in nodes for v in n.outputs]
    for v in inputs:
        g.names[id(v)] = g.fresh(v.name)
    fed = {v.name for v in inputs}
    latest = {v.name: v for v in values}
    for v in values:  # blob names first, so they win over helper names
        if id(v) in g.names or v.name in fed:
            continue
        if latest[v.name] is v:
            g.names[id(v)] = g.fresh(v.name)
    for v in values:
        if id(v) not in g.names:
            g.names[id(v)] = g.fresh(f"{v.name}@{v.producer.layer.name}")
    for vid, root in aliases.items():  # insertion order follows the chain: the last one wins
        g.names[id(root)] = g.names[vid]


def _value_info(name: str, shape: Shape | None, dynamic: bool) -> onnx.ValueInfoProto:
    if shape is None:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
    dims: list[Any] = list(shape)
    if dynamic and dims:
        dims[0] = "N"
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)


@dataclass
class _Folding:
    overrides: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)
    aliases: dict[int, Value] = field(default_factory=dict)  # folded value -> conv output
    folded: set[int] = field(default_factory=set)  # ids of folded nodes
    notes: list[str] = field(default_factory=list)


def _fold_bn(flow: Dataflow, nodes: Sequence[Node]) -> _Folding:
    """Fold BatchNorm (and a Scale right after it) into the Convolution before it.

    Folded when: the convolution's only lowered consumer is the BatchNorm (using global
    statistics), the BatchNorm's only consumer is the Scale (``axis: 1``, ``num_axes: 1``, one
    bottom), and every blob is loaded. The product is computed in float64, stored as float32.
    """
    fold = _Folding()
    lowered = {id(n) for n in nodes}
    for node in nodes:
        lay = node.layer
        if lay.type != "Convolution" or len(node.outputs) != 1 or len(node.inputs) != 1:
            continue
        if any(p.data is None for p in lay.params) or not lay.params:
            continue
        chain = _fold_chain(flow, node.outputs[0], lowered)
        if not chain:
            continue
        w = np.asarray(lay.params[0].data, dtype=np.float64)
        c = w.shape[0]
        b = (np.asarray(lay.params[1].data, dtype=np.float64).reshape(-1)
             if attr(lay, "bias_term", True) else np.zeros(c))
        for step in chain:
            mul, add = _affine_of(step, c)
            w = w * mul.reshape((c,) + (1,) * (w.ndim - 1))
            b = b * mul + add
        fold.overrides[(lay.name, 0)] = w.astype(np.float32)
        fold.overrides[(lay.name, 1)] = b.astype(np.float32)
        for step in chain:
            fold.aliases[id(step.outputs[0])] = node.outputs[0]
            fold.folded.add(id(step))
        fold.notes.append(f"folded {' + '.join(repr(s.layer.name) for s in chain)} into "
                          f"{lay.name!r}")
    return fold


def _fold_chain(flow: Dataflow, value: Value, lowered: set[int]) -> list[Node]:
    chain: list[Node] = []
    for want in ("BatchNorm", "Scale"):
        users = [n for n, _ in flow.consumers(value) if id(n) in lowered]
        if len(users) != 1 or users[0].layer.type != want or len(users[0].inputs) != 1:
            break
        step = users[0]
        if any(p.data is None for p in step.layer.params) or not step.layer.params:
            break
        if want == "BatchNorm" and not batch_norm_facts(step.layer).global_stats(
                flow.state.phase):
            break
        if want == "Scale" and (int(attr(step.layer, "axis", 1)) != 1
                                or int(attr(step.layer, "num_axes", 1)) != 1):
            break
        chain.append(step)
        value = step.outputs[0]
    return chain


def _affine_of(node: Node, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """``(a, b)`` per channel such that the layer computes ``a * x + b``."""
    lay = node.layer
    if lay.type == "BatchNorm":
        f = batch_norm_facts(lay)
        assert f.mean is not None and f.var is not None
        inv = 1.0 / np.sqrt(f.var.astype(np.float64) + np.float64(np.float32(f.eps)))
        mul, add = inv, -f.mean.astype(np.float64) * inv
    else:
        mul = np.asarray(lay.params[0].data, dtype=np.float64).reshape(-1)
        add = (np.asarray(lay.params[1].data, dtype=np.float64).reshape(-1)
               if attr(lay, "bias_term", False) else np.zeros_like(mul))
    return np.broadcast_to(mul, (channels,)), np.broadcast_to(add, (channels,))


def to_onnx(
    net: Net,
    opset: int = 17,
    dynamic_batch: bool = False,
    fold_bn: bool = False,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    *,
    phase: str = "TEST",
    expose_blobs: bool = False,
    preprocess: PreprocessSpec | None = None,
    pixels: str = "rgb255",
) -> onnx.ModelProto:
    """Build an ONNX model computing what Caffe computes for ``net`` in ``phase``.

    Args:
        net: the net, with weights loaded.
        opset: the ONNX opset (13..21; Softmax needs 13 for Caffe's axis meaning).
        dynamic_batch: make axis 0 of the inputs and outputs symbolic (``N``).
        fold_bn: fold BatchNorm (+ Scale) into the Convolution before it.
        input_shapes: shapes of the inputs by blob name, overriding the Input layers'; data
            layers' tops not given get what ``surgery info`` infers (noted in ``doc_string``).
        phase: ``"TEST"`` (default) or ``"TRAIN"`` (loss layers are then lowered and their
            tops become outputs).
        expose_blobs: also make every blob a graph output, to compare every intermediate
            with Caffe (earlier in-place versions as ``<blob>@<layer>``).
        preprocess: put these steps (:mod:`surgery.export.preprocess`) in front of the graph:
            a new input ``image`` (RGB, NHWC) replaces ``preprocess.input``; the model's
            ``metadata_props`` (``caffe_surgery.preprocess``) and ``doc_string`` say so.
        pixels: the new input's values: ``"rgb255"`` (uint8 0-255) or ``"rgb01"`` (float
            0-1).

    Returns:
        The model; ``onnx.checker.check_model(model, full_check=True)`` passes. Its
        ``doc_string`` lists the layers dropped or folded.

    Raises:
        UnsupportedLayerError: the layers (all of them) the table cannot lower.
        NetError: layers without weights, or a net Caffe would refuse.
        ShapeMismatchError: weights that do not fit the definition.
        SurgeryError: an opset outside the supported range, or unknown input shapes.
    """
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise SurgeryError(f"opset {opset} is not supported; use {MIN_OPSET}..{MAX_OPSET} "
                           "(Caffe's Softmax axis needs 13 or later)")
    shapes = {k: tuple(int(d) for d in v) for k, v in (input_shapes or {}).items()}
    p = plan(net, phase, supported=supported_types(), input_shapes=shapes,
             lower_detection_output=False, infer_shapes=False)
    info = infer(p.flow, p.start_shapes)  # checks the weights' shapes too
    g = _Graph(p.flow, info, opset, dynamic_batch)
    for v in p.inputs:
        if info.shape(v) is None:
            raise SurgeryError(f"the shape of input {v.name!r} is unknown; give it with "
                               f"input_shapes / --input-shape {v.name}=N,C,H,W")
    _check_configs(g, p.nodes)
    fold = _fold_bn(p.flow, p.nodes) if fold_bn else _Folding()
    g.overrides = fold.overrides
    _name_values(g, p.inputs, p.nodes, fold.aliases)

    def tensor(v: Value) -> str:
        return g.names[id(fold.aliases.get(id(v), v))]

    for node in p.nodes:
        if id(node) in fold.folded:
            continue
        g.scope = node.layer.name
        _TABLE[node.layer.type].fn(g, node, [tensor(v) for v in node.inputs],
                                   [tensor(v) for v in node.outputs])
    pre_input = pre_note = None
    if preprocess is not None:
        start = len(g.nodes)
        pre_input, pre_note = _preprocess_nodes(g, preprocess, pixels, p.inputs, tensor)
        g.nodes[:] = g.nodes[start:] + g.nodes[:start]  # in front: nodes in topological order
    outputs = list(p.outputs)
    if expose_blobs:
        taken = {tensor(v) for v in outputs} | {tensor(v) for v in p.inputs}
        for node in p.nodes:
            for v in node.outputs:
                if tensor(v) not in taken and id(node) not in fold.folded:
                    outputs.append(v)
                    taken.add(tensor(v))
    batched = {id(v) for v in p.inputs}  # values carrying the batch axis (not PriorBox's)
    for node in p.nodes:
        if node.layer.type != "PriorBox" and any(id(v) in batched for v in node.inputs):
            batched.update(id(v) for v in node.outputs)
    out_infos: dict[str, onnx.ValueInfoProto] = {}
    for v in outputs:
        out_infos.setdefault(tensor(v), _value_info(tensor(v), info.shape(v),
                                                    dynamic_batch and id(v) in batched))
    graph = helper.make_graph(
        g.nodes,
        net.name or "caffe_net",
        [pre_input if preprocess is not None and v.name == preprocess.input else
         _value_info(tensor(v), info.shape(v), dynamic_batch) for v in p.inputs],
        list(out_infos.values()),
        initializer=g.inits,
    )
    opset_id = helper.make_opsetid("", opset)
    model = helper.make_model(graph, opset_imports=[opset_id], producer_name="caffe-surgery",
                              ir_version=helper.find_min_ir_version_for([opset_id]))
    model.doc_string = "\n".join(p.notes + fold.notes + ([pre_note] if pre_note else []))
    if preprocess is not None:
        meta = {**preprocess.to_json(with_mean=False), "pixels": pixels,
                "graph_input": pre_input.name}
        helper.set_model_props(model, {"caffe_surgery.preprocess": json.dumps(meta),
                                       "caffe_surgery.input": pre_note})
    return model


def _preprocess_nodes(g: _Graph, spec: PreprocessSpec, pixels: str, inputs: Sequence[Value],
                      tensor: Callable[[Value], str]) -> tuple[onnx.ValueInfoProto, str]:
    """Nodes computing the net input ``spec.input`` from a new RGB NHWC input (uint8 for
    ``rgb255``, float for ``rgb01``): Cast, Transpose, Gather (RGB->BGR), Mul 255, Slice
    (centre crop; dynamic offsets when the image size is free), Sub (mean), Mul (scale)."""
    if pixels not in PIXELS:
        raise SurgeryError(f"--preprocess {pixels!r}: choose {' or '.join(PIXELS)}")
    found = [v for v in inputs if v.name == spec.input]
    if not found:
        raise SurgeryError(f"preprocessing ({spec.origin}) feeds {spec.input!r}, which is not an "
                           f"input of the export (inputs: {[v.name for v in inputs]})")
    target = tensor(found[0])
    shape = g.info.shape(found[0])
    check_input(spec, [v.name for v in inputs], shape)
    g.scope = "preprocess"
    name = g.fresh("image")
    c = spec.channels
    size = spec.image_size
    if size is not None:
        h, w = size
    elif spec.crop_size:
        h, w = "H", "W"  # any size >= the crop: offsets computed in the graph
    else:
        h, w = (int(shape[2]), int(shape[3])) if shape and len(shape) == 4 else ("H", "W")
    batch = "N" if g.dynamic_batch or not shape else int(shape[0])
    dtype = onnx.TensorProto.UINT8 if pixels == "rgb255" else onnx.TensorProto.FLOAT
    value = helper.make_tensor_value_info(name, dtype, [batch, h, w, c])
    x = name
    if pixels == "rgb255":
        x = g.op("Cast", [x], to=onnx.TensorProto.FLOAT)
    x = g.op("Transpose", [x], perm=[0, 3, 1, 2])
    if spec.swap:
        x = g.op("Gather", [x, g.ints("bgr", [2, 1, 0])], axis=1)
    if pixels == "rgb01":
        x = g.op("Mul", [x, g.const("x255", np.float32(255))])
    crop = spec.crop_size
    if crop and size is not None:
        h0, w0 = (size[0] - crop) // 2, (size[1] - crop) // 2
        x = g.op("Slice", [x, g.ints("starts", [h0, w0]), g.ints("ends", [h0 + crop, w0 + crop]),
                           g.ints("axes", [2, 3])])
    elif crop:
        hw = g.op("Slice", [g.op("Shape", [x]), g.ints("hw_from", [2]), g.ints("hw_to", [4])])
        starts = g.op("Div", [g.op("Sub", [hw, g.ints("crop", [crop, crop])]),
                              g.ints("two", [2, 2])])
        ends = g.op("Add", [starts, g.ints("crop_", [crop, crop])])
        x = g.op("Slice", [x, starts, ends, g.ints("axes", [2, 3])])
    if spec.mean_image is not None:
        mh, mw = spec.mean_image.shape[1:]
        ch, cw = (crop, crop) if crop else (mh, mw)
        h0, w0 = (mh - ch) // 2, (mw - cw) // 2
        x = g.op("Sub", [x, g.const("mean", spec.mean_image[None, :, h0:h0 + ch, w0:w0 + cw])])
    elif spec.mean_values:
        mv = np.asarray(spec.mean_values, np.float32)
        mv = mv if len(mv) == c else np.repeat(mv[:1], c)
        x = g.op("Sub", [x, g.const("mean", mv.reshape(1, c, 1, 1))])
    if spec.scale != 1:
        x = g.op("Mul", [x, g.const("scale", np.float32(spec.scale))])
    g.op("Identity", [x], target)
    what = "uint8 0-255" if pixels == "rgb255" else "float 0-1"
    note = (f"input {name!r}: RGB images, {what}, NHWC {batch}x{h}x{w}x{c}; preprocessed in the "
            f"graph into {spec.input!r} ({'; '.join(spec.steps())})")
    return value, note


def save_onnx(
    net: Net,
    path: str | os.PathLike[str],
    opset: int = 17,
    dynamic_batch: bool = False,
    fold_bn: bool = False,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    *,
    phase: str = "TEST",
    external_threshold: int | None = None,
    preprocess: PreprocessSpec | None = None,
    pixels: str = "rgb255",
) -> onnx.ModelProto:
    """Export ``net``, check the model fully and write it to ``path`` atomically.

    A model whose initializers exceed ``external_threshold`` bytes (default: just under
    protobuf's 2 GiB message limit) keeps them in ``<path>.data`` beside it (ONNX external
    data). Both files are written and checked in a hidden folder beside ``path`` and only then
    moved into place, so a failure leaves an existing model and its data untouched. A
    ``.data`` file that the replaced model used and the new one does not is removed with it.

    Returns:
        The model (its initializers point to the external file when one was written).

    Raises:
        the errors of :func:`to_onnx`; SurgeryError when the file cannot be written or the
        checker refuses the model.
    """
    from .. import _atomic

    model = to_onnx(net, opset, dynamic_batch, fold_bn, input_shapes, phase=phase,
                    preprocess=preprocess, pixels=pixels)
    limit = EXTERNAL_DATA_THRESHOLD if external_threshold is None else external_threshold
    out = Path(path)
    external = sum(t.ByteSize() for t in model.graph.initializer) > limit
    data = out.with_name(out.name + ".data")
    for src in (net.source, net.weights_source):
        if src is not None and external and os.path.realpath(src) == os.path.realpath(data):
            raise SurgeryError(f"{data}: the external data file would overwrite the input {src}; "
                               "choose another output name")
    try:
        # Both files are written and checked in a scratch folder beside the target, then moved
        # onto their own temporaries and renamed together (surgery._atomic): an existing model
        # and the .data file it points to stay intact until the new pair is complete.
        with _atomic.outputs() as tx:
            staging = tx.scratch(out)
            tmp = staging / out.name
            if external:
                onnx.save_model(model, str(tmp), save_as_external_data=True,
                                all_tensors_to_one_file=True, location=data.name,
                                size_threshold=0)
                onnx.checker.check_model(str(tmp), full_check=True)
                os.replace(staging / data.name, tx.file(data))
            else:
                onnx.checker.check_model(model, full_check=True)
                onnx.save_model(model, str(tmp))
                if _uses_data_file(out, data.name):  # the model replaced kept its weights there
                    tx.remove(data)
            os.replace(tmp, tx.file(out))
    except OSError as exc:
        raise SurgeryError(f"{path}: cannot write: {exc.strerror or exc}") from None
    except onnx.checker.ValidationError as exc:
        raise SurgeryError(f"{path}: the ONNX checker refused the export: {exc}") from None
    return model


def _uses_data_file(model_path: Path, location: str) -> bool:
    """Whether the ONNX file ``model_path`` keeps tensors in the external file ``location``."""
    try:
        old = onnx.load(str(model_path), load_external_data=False)
    except Exception:  # no model there, or not one we can read: leave its neighbours alone
        return False
    return any(e.key == "location" and e.value == location
               for t in old.graph.initializer for e in t.external_data)


# -- running -----------------------------------------------------------------------------------
def providers(device: str = "auto") -> list[str]:
    """onnxruntime execution providers: CUDA first when available (``auto``), else CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda" and "CUDAExecutionProvider" not in available:
        raise SurgeryError("onnxruntime has no CUDA provider here; install onnxruntime-gpu")
    chosen = [p for p in ("CUDAExecutionProvider",) if p in available]
    return chosen + ["CPUExecutionProvider"]


_ORT_TYPES = {"tensor(uint8)": np.uint8, "tensor(float)": np.float32}


def run_onnx(model: onnx.ModelProto, inputs: Mapping[str, np.ndarray],
             device: str = "auto") -> dict[str, np.ndarray]:
    """Run a model with onnxruntime; returns every graph output by name."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=providers(device))
    names = [o.name for o in sess.get_outputs()]
    feed = {i.name: np.ascontiguousarray(inputs[i.name], dtype=_ORT_TYPES.get(i.type, np.float32))
            for i in sess.get_inputs()}
    return dict(zip(names, sess.run(names, feed), strict=True))
