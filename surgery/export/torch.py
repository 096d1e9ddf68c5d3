"""Export to PyTorch: one lowering table building a ``torch.fx.Graph`` directly (no tracing).

:func:`to_torch` walks the :class:`~surgery.export.common.ExportPlan` in topological order and
calls one plain function per Caffe type (registered with :func:`lowering`; registering a type
twice is an error). Learnable blobs become ``nn.Parameter``\\ s of standard modules where
PyTorch has the same semantics (``nn.Conv2d``, ``nn.ConvTranspose2d``, ``nn.Linear``,
``nn.PReLU``) and of the small modules in :mod:`surgery.export._torch_runtime` elsewhere;
submodule names are sanitized Caffe layer names (``conv1/7x7_s2`` -> ``conv1_7x7_s2``),
deduplicated, with ``caffe_names`` mapping every parameter and buffer back to its layer and
blob index.

Conventions of the exported module:

* ``forward`` takes one tensor per graph input, in order, named after the (sanitized) tops of
  the ``Input``/data layers (``model.input_names`` holds the Caffe names).
* It returns the single output tensor when the net has one output and no loss, otherwise a
  dict ``{blob name: tensor}``; with ``keep_blobs=True`` the dict holds every blob (the last
  version of each name, as Caffe's in-place layers leave it). In TRAIN the dict also holds the
  weighted total loss under ``model.total_loss_key`` (``"total_loss"``).
* With ``outputs=[...]`` (``export torch --outputs pool5,fc7``) it always returns a dict of
  exactly those blobs, one output included, each with Caffe's value after the forward pass:
  ``fc7`` after the in-place ``relu7`` (and ``drop7``, identity in TEST); ``fc7@fc7`` names
  the version before them. Only the layers they depend on are exported.
* ``model.train()``/``model.eval()`` are Caffe's TRAIN/TEST for Dropout and BatchNorm (unless
  the layer pins ``use_global_stats``); ``lr_mult: 0`` blobs have ``requires_grad=False``;
  :func:`param_groups` gives optimizer groups with the lr/decay multipliers.
* PriorBox tops are constants (buffers) computed for the input size known at export time
  (``input_shapes`` or the ``Input`` layer).
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import operator
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from ..dataflow import Node, Value
from ..errors import NetError, SurgeryError, UnsupportedLayerError
from ..layers import LEARNABLE_TYPES, attr
from ..net import Net, NetState
from . import _torch_runtime as rt
from . import common
from .finetune import param_groups
from .preprocess import PreprocessSpec

__all__ = [
    "lowering",
    "torch_supported_types",
    "to_torch",
    "run_blobs",
    "param_groups",
    "save_torch",
    "generate_source",
    "LoweringContext",
]

Lowering = Callable[["LoweringContext", Node, list[fx.Node]], list[fx.Node]]
_TABLE: dict[str, Lowering] = {}


def lowering(*types: str) -> Callable[[Lowering], Lowering]:
    """Register the PyTorch lowering of one or more Caffe types.

    Raises:
        ValueError: a type is already registered.
    """

    def deco(fn: Lowering) -> Lowering:
        for t in types:
            if t in _TABLE:
                raise ValueError(f"layer type {t!r} already has a torch lowering "
                                 f"({_TABLE[t].__name__})")
            _TABLE[t] = fn
        return fn

    return deco


def torch_supported_types() -> frozenset[str]:
    """The Caffe layer types the PyTorch table lowers."""
    return frozenset(_TABLE)


# -- the lowering context ---------------------------------------------------------------------
#: Names a submodule or buffer must not take, so a layer called ``train``, ``to``, ``graph`` or
#: ``code`` cannot shadow a method: the public attributes of ``fx.GraphModule`` (and so of
#: ``nn.Module``), the ones :func:`to_torch` sets, and those of the generated ``model.py`` class.
_MODULE_ATTRS = frozenset(n for n in dir(fx.GraphModule) if not n.startswith("_")) | {
    "caffe_names", "caffe_lr", "input_names", "output_names", "loss_weights", "total_loss_key",
    "notes", "caffe_phase", "CAFFE_LR", "CAFFE_NAMES", "CAFFE_PHASE", "load_weights",
    "input_shapes",
}


@dataclass
class LoweringContext:
    """What a lowering function may use: the graph, the root module and the plan."""

    graph: fx.Graph
    root: nn.Module
    plan: common.ExportPlan
    caffe_names: dict[str, dict[str, Any]] = field(default_factory=dict)
    lr: dict[str, tuple[float, float]] = field(default_factory=dict)
    shared: dict[str, nn.Parameter] = field(default_factory=dict)
    missing: str = "error"
    rng: np.random.Generator | None = None
    keep_blobs: bool = False
    _taken: set[str] = field(default_factory=lambda: set(_MODULE_ATTRS))

    @property
    def phase(self) -> str:
        return self.plan.phase

    def shape(self, value: Value) -> tuple[int, ...] | None:
        return self.plan.input_shape(value)

    def bottom_shapes(self, node: Node) -> list[tuple[int, ...] | None]:
        return [self.shape(v) for v in node.inputs]

    def ndim(self, node: Node, i: int = 0) -> int:
        """Number of axes of bottom ``i`` (4 when unknown: Caffe's usual N, C, H, W)."""
        s = self.shape(node.inputs[i])
        return 4 if s is None else len(s)

    def add_module(self, node: Node, module: nn.Module) -> str:
        """Attach ``module`` under the sanitized layer name; map its tensors to Caffe blobs."""
        name = common.py_identifier(node.layer.name, self._taken)
        self._taken.add(name)
        self.root.add_module(name, module)
        return name

    def blob(self, node: Node, index: int, shape: Sequence[int]) -> torch.Tensor:
        """Learnable blob ``index`` of ``node`` as a float32 tensor of ``shape``.

        Missing weights are filled from the layer's fillers with ``missing='fill'``; with
        ``missing='error'`` they were reported before lowering.
        """
        params = node.layer.params
        data = params[index].data if index < len(params) else None
        if data is None:
            if self.missing != "fill":
                raise NetError(f"layer {node.layer.name!r} has no weights for blob {index}")
            from ..fillers import fill, layer_fillers

            fillers = layer_fillers(node.layer)
            data = fill(fillers[index] if index < len(fillers) else None, shape,
                        self.rng or np.random.default_rng(0))
        arr = np.asarray(data, dtype=np.float32)
        from ..shapes import blob_shape_matches

        if arr.size != math.prod(shape) or not blob_shape_matches(shape, arr.shape):
            raise NetError(
                f"layer {node.layer.name!r}: blob {index} has shape {tuple(arr.shape)} "
                f"({arr.size} values), the layer needs {tuple(shape)}. Rename the layer to "
                "learn it from scratch, or fix its parameters."
            )
        return torch.from_numpy(arr.reshape(tuple(shape)).copy())

    def set_param(self, node: Node, module_name: str, attr_name: str, index: int,
                  value: torch.Tensor, transform: str | None = None) -> None:
        """Put blob ``index`` into ``module.attr_name`` as a Parameter, with lr/decay mults."""
        module = self.root.get_submodule(module_name)
        spec = node.layer.params[index] if index < len(node.layer.params) else None
        key = f"{module_name}.{attr_name}"
        share = spec.name if spec is not None and spec.name else None
        if share and share in self.shared:
            setattr(module, attr_name, self.shared[share])
        else:
            p = nn.Parameter(value, requires_grad=True)
            setattr(module, attr_name, p)
            if share:
                self.shared[share] = p
        lr_mult = common.clean_float(spec.effective_lr_mult) if spec is not None else 1.0
        decay_mult = common.clean_float(spec.effective_decay_mult) if spec is not None else 1.0
        getattr(module, attr_name).requires_grad_(lr_mult != 0.0)
        self.lr[key] = (lr_mult, decay_mult)
        entry: dict[str, Any] = {"layer": node.layer.name, "blob": index}
        if transform:
            entry["transform"] = transform
        if share:
            entry["shared"] = share
        self.caffe_names[key] = entry

    def set_buffer(self, node: Node, module_name: str, attr_name: str, index: int | None,
                   value: torch.Tensor, transform: str | None = None) -> None:
        module = self.root.get_submodule(module_name)
        getattr(module, attr_name).data = value  # registered by the module
        if index is not None:
            entry: dict[str, Any] = {"layer": node.layer.name, "blob": index}
            if transform:
                entry["transform"] = transform
            self.caffe_names[f"{module_name}.{attr_name}"] = entry

    def constant(self, node: Node, value: np.ndarray, suffix: str = "const") -> fx.Node:
        """A non-learnable constant (PriorBox) as a buffer read with ``get_attr``."""
        name = common.py_identifier(f"{node.layer.name}_{suffix}", self._taken)
        self._taken.add(name)
        self.root.register_buffer(name, torch.from_numpy(np.ascontiguousarray(value)))
        self.caffe_names[name] = {"layer": node.layer.name, "blob": None, "transform": "constant"}
        return self.graph.get_attr(name)

    def call_module(self, name: str, args: Sequence[Any]) -> fx.Node:
        return self.graph.call_module(name, tuple(args))

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> fx.Node:
        return self.graph.call_function(fn, tuple(args), kwargs)

    def split(self, node: fx.Node, n: int) -> list[fx.Node]:
        return [self.graph.call_function(operator.getitem, (node, i)) for i in range(n)]


# -- lowerings: convolution and fully connected -----------------------------------------------
_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_DECONV = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


def _conv_like(ctx: LoweringContext, node: Node, xs: list[fx.Node], deconv: bool) -> list[fx.Node]:
    shape = ctx.shape(node.inputs[0])
    if shape is None:
        raise NetError(f"layer {node.layer.name!r}: the input shape is unknown; give "
                       "input_shapes to to_torch")
    g = common.conv_geometry(node.layer, len(shape) - 2)
    if common.canonical_axis(g.axis, len(shape)) != 1:
        raise UnsupportedLayerError(f"layer {node.layer.name!r}: convolution over axis "
                                    f"{g.axis} (only 1 is exported)")
    cin = shape[1]
    table = _DECONV if deconv else _CONV
    if g.num_spatial not in table:
        raise UnsupportedLayerError(f"layer {node.layer.name!r}: {g.num_spatial} spatial axes")
    # On the meta device: no random init of tensors the Caffe blobs replace at once.
    mod = table[g.num_spatial](cin, g.num_output, g.kernel, stride=g.stride, padding=g.pad,
                               dilation=g.dilation, groups=g.group, bias=g.bias_term,
                               device="meta")
    name = ctx.add_module(node, mod)
    wshape = tuple(mod.weight.shape)  # torch layouts equal Caffe's for both kinds
    ctx.set_param(node, name, "weight", 0, ctx.blob(node, 0, wshape))
    if g.bias_term:
        ctx.set_param(node, name, "bias", 1, ctx.blob(node, 1, (g.num_output,)))
    return [ctx.call_module(name, [x]) for x in xs]


@lowering("Convolution", "ConvolutionDepthwise", "DepthwiseConvolution")
def _convolution(ctx: LoweringContext, node: Node, xs: list[fx.Node]) -> list[fx.Node]:
    return _conv_like(ctx, node, xs, deconv=False)


@lowering("Deconvolution")
def _deconvolution(ctx: LoweringContext, node: Node, xs: list[fx.Node]) -> list[fx.Node]:
    return _conv_like(ctx, node, xs, deconv=True)


@lowering("InnerProduct")
def _inner_product(ctx: LoweringContext, node: Node, xs: list[fx.Node]) -> list[fx.Node]:
    shape = ctx.shape(node.inputs[0])
    if shape is None:
        raise NetError(f"layer {node.layer.name!r}: the input shape is unknown; give "
                       "input_shapes to to_torch")
    axis = common.canonical_axis(int(attr(node.layer, "axis", 1)), len(shape))
    k = math.prod(shape[axis:])
    n = int(attr(node.layer, "num_output", 0))
    bias = bool(attr(node.layer, "bias_term", True))
    transpose = bool(attr(node.layer, "transpose", False))
    mod: nn.Module = (rt.CaffeInnerProduct(k, n, bias) if transpose
                      else nn.Linear(k, n, bias, device="meta"))
    name = ctx.add_module(node, mod)
    ctx.set_param(node, name, "weight", 0, ctx.blob(node, 0, (k, n) if transpose else (n, k)))
    if bias:
        ctx.set_param(node, name, "bias", 1, ctx.blob(node, 1, (n,)))
    x = xs[0]
    if axis != len(shape) - 1 or len(shape) != 2:
        x = ctx.call(torch.flatten, x, axis)
    return [ctx.call_module(name, [x])]


# -- pooling ----------------------------------------------------------------------------------
@lowering("Pooling")
def _pooling(ctx: LoweringContext, node: Node, xs: list[fx.Node]) -> list[fx.Node]:
    g = common.pool_geometry(node.layer)
    if g.method == "STOCHASTIC" and ctx.phase == "TRAIN":
        raise UnsupportedLayerError(
            f"layer {node.layer.name!r}: STOCHASTIC pooling samples at TRAIN; only its TEST "
            "rule (sum x^2 / sum x) is exported. Export with phase test, or use MAX/AVE."
        )
    if len(node.layer.tops) > 1:
        if g.method != "MAX":
            raise UnsupportedLayerError(f"layer {node.layer.name!r}: a mask top needs MAX")
        both = ctx.call(rt.caffe_max_pool2d_mask, xs[0], g.kernel, g.stride, g.pad, g.ceil)
        return ctx.split(both, 2)
    return [ctx.call(rt.caffe_pool2d, xs[0], g.method, g.kernel, g.stride, g.pad, g.ceil)]


# -- activations ------------------------------------------------------------------------------
def _inplace_ok(ctx: LoweringContext, node: Node, x: fx.Node) -> bool:
    """True when overwriting the bottom is invisible, as Caffe's in-place ReLU after a
    Convolution/InnerProduct: their backward needs only their inputs, the value has this one
    reader, and it is neither returned nor kept."""
    if ctx.keep_blobs or x.op != "call_module":
        return False
    mod = ctx.root.get_submodule(str(x.target))
    if not isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
        return False
    value = node.inputs[0]
    return len(ctx.plan.flow.consumers(value)) == 1 and value not in ctx.plan.outputs


@lowering("ReLU")
def _relu(ctx: LoweringContext, node: Node, xs: list[fx.Node]) -> list[fx.Node]:
    slope = float(attr(node.layer, "negative_slope", 0.0))
    if slope == 0.0:
        if _inplace_ok(ctx, node, xs[0]):
            return [ctx.call(torch.relu_, xs[0])]
        return [ctx.call(torch.relu, xs[0])]
    return [ctx.call(nn.functional.leaky_relu, xs[0], slope)]


@lowering("PReLU")
def _prelu(ctx: LoweringContext, node: Node, xs: list[fx.Node]) -> list[fx.Node]:
    shape = ctx.shape(node.inputs[0])
    shared = bool(attr(node.layer, "channel_shared", False))
    c = 1 if shared else (shape[1] if shape else len(np.asarray(node.layer.params[0].data)))
    mod = nn.PReLU(c)
    name = ctx.add_module(node, mod)
    ctx.set_param(node, name, "weight", 0, ctx.blob(node, 0, (c,)))
    return [ctx.call_module(name, [xs[0]])]


@lowering("Sigmoid")
def _sigmoid(ctx: LoweringContext, node: Node, xs: list[fx.Node]) -> list[fx.Node]:
    return [ctx.call(torch.sigmoid, xs[0])]


@lowering("TanH")
def _tanh(ctx: LoweringContext, node: Node, xs: list[fx.Node]) -> list[fx.Node]:
    return [ctx.call(torch.tanh, xs[0])]


@lowering("ELU")
def _elu(ctx: LoweringContext, node: Node, xs: list[fx.Node]) -> list[fx.Node]:
    return [ctx.call(nn.functional.elu, xs[0], float(attr(node.layer, "alpha", 1.0)))]


@lowering("AbsVal")
def _absval(ctx: LoweringContext, node: Node, xs: list[fx.Node]) -> list[fx.Node]:
    return [ctx.call(torch.abs, xs[0])]


@lowering("Power")
def _power(ctx: LoweringContext, node: Node, xs: list[fx.Node]) -> list[fx.Node]:
    a = node.layer
    return [ctx.call(rt.caffe_power, xs[0], float(attr(a, "power", 1.0)),
                     float(attr(a, "scale", 1.0)), float(attr(a, "shift", 0.0)))]


@lowering("Exp")
def _exp(ctx: LoweringContext, node: Node, xs: list[fx.Node]) -> list[fx.Node]:
    a = node.layer
    return [ctx.call(rt.caffe_exp, xs[0], float(attr(a, "base", -1.0)),
                     float(attr(a, "scale", 1.0)), float(attr(a, "shift", 0.0)))]


@lowering("Log")
def _log(ctx: LoweringContext, node: Node, xs: list[fx.Node]) -> list[fx.Node]:
    a = node.layer
    return [ctx.call(rt.caffe_log, xs[0], float(attr(a, "base", -1.0)),
                     float(attr(a, "scale", 1.0)), float(attr(a, "shift", 0.0)))]


@lowering("BNLL")
def _bnll(ctx: LoweringContext, node: Node, xs: list[fx.Node]) -> list[fx.Node]:
    return [ctx.call(rt.caffe_bnll, xs[0])]


@lowering("Threshold")
def _threshold(ctx: LoweringContext, node: Node, xs: list[fx.Node]) -> list[fx.Node]:
    return [ctx.call(rt.caffe_threshold, xs[0], float(attr(node.layer, "threshold", 0.0)))]


@lowering("Clip")
def _clip(ctx: LoweringContext, node: Node, xs: list[fx.Node]) -> list[fx.Node]:
    return [ctx.call(torch.clamp, xs[0], float(attr(node.layer, "min", 0.0)),
                     float(attr(node.layer, "max", 0.0)))]


@lowering("Swish")
def _swish(ctx: LoweringContext, node: Node, xs: list[fx.Node]) -> list[fx.Node]:
    return [ctx.call(rt.caffe_swish, xs[0], float(attr(node.layer, "beta", 1.0)))]


@lowering("Dropout")
def _dropout(ctx: LoweringContext, node: Node, xs: list[fx.Node]) -> list[fx.Node]:
    # Caffe's Dropout is inverted (x * mask / (1 - p) at TRAIN, a copy at TEST), as
    # nn.Dropout. The Fast R-CNN fork's scale_train: false scales at TEST instead
    # (x * mask at TRAIN, x * (1 - p) at TEST): nn.Dropout times (1 - p) in both modes.
    ratio = float(attr(node.layer, "dropout_ratio", 0.5))
    name = ctx.add_module(node, nn.Dropout(ratio))
    y = ctx.call_module(name, [xs[0]])
    if not bool(attr(node.layer, "scale_train", True)):
        y = ctx.call(operator.mul, y, 1.0 - ratio)
    return [y]


# -- normalization ----------------------------------------------------------------------------
@lowering("BatchNorm")
def _batch_norm(ctx: LoweringContext, node: Node, xs: list[fx.Node]) -> list[fx.Node]:
    f = common.batch_norm_facts(node.layer)
    shape = ctx.shape(node.inputs[0])
    if f.mean is None:
        if ctx.missing != "fill":
            raise NetError(f"layer {node.layer.name!r} has no weights")
        c = shape[1] if shape and len(shape) > 1 else 1
        mean, var = np.zeros(c, np.float32), np.ones(c, np.float32)
    else:
        mean, var = f.mean, f.var
    assert var is not None
    mod = rt.CaffeBatchNorm(len(mean), f.eps, f.momentum, f.use_global_stats, f.factor)
    name = ctx.add_module(node, mod)
    how = "divided by blob 2"
    ctx.set_buffer(node, name, "running_mean", 0, torch.from_numpy(mean.copy()), how)
    ctx.set_buffer(node, name, "running_var", 1, torch.from_numpy(var.copy()), how)
    for buf in ("running_mean", "running_var"):  # for the way back (export.caffemodel)
        ctx.caffe_names[f"{name}.{buf}"]["factor"] = f.factor
    return [ctx.call_module(name, [xs[0]])]


@lowering("BN")
def _fork_bn(ctx: LoweringContext, node: Node, xs: list[fx.Node]) -> list[fx.Node]:
    f = common.bn_facts(node.layer)  # rule 5; UnsupportedLayerError when the fork is unclear
    shape = ctx.shape(node.inputs[0])
    c = shape[1] if shape and len(shape) > 1 else 1
    if f.layout == "pspnet":
        mode = "pspnet"
    else:
        mode = "inference" if f.mode == "INFERENCE" else "learn"
    mod = rt.CaffeBN(c, mode, f.eps, f.momentum, f.frozen)
    name = ctx.add_module(node, mod)
    ctx.set_param(node, name, "weight", 0, ctx.blob(node, 0, (1, c, 1, 1)).reshape(c))
    ctx.set_param(node, name, "bias", 1, ctx.blob(node, 1, (1, c, 1, 1)).reshape(c))
    if mode == "pspnet":
        for i, buf in ((2, "running_mean"), (3, "running_var")):
            ctx.set_buffer(node, name, buf, i, ctx.blob(node, i, (1, c, 1, 1)).reshape(c))
    return [ctx.call_module(name, [xs[0]])]


@lowering("LRN")
def _lrn(ctx: LoweringContext, node: Node, xs: list[fx.Node]) -> list[fx.Node]:
    f = common.lrn_facts(node.layer)
    return [ctx.call(rt.caffe_lrn, xs[0], f.local_size, f.alpha, f.beta, f.k,
                     f.region == "WITHIN_CHANNEL")]


@lowering("Normalize")
def _normalize(ctx: LoweringContext, node: Node, xs: list[fx.Node]) -> list[fx.Node]:
    a = node.layer
    shape = ctx.shape(node.inputs[0])
    shared = bool(attr(a, "channel_shared", True))
    c = 1 if shared else (shape[1] if shape else 1)
    mod = rt.CaffeNormalize(c, bool(attr(a, "across_spatial", True)), float(attr(a, "eps", 1e-10)))
    name = ctx.add_module(node, mod)
    ctx.set_param(node, name, "weight", 0, ctx.blob(node, 0, (c,)))
    return [ctx.call_module(name, [xs[0]])]


@lowering("MVN")
def _mvn(ctx: LoweringContext, node: Node, xs: list[fx.Node]) -> list[fx.Node]:
    a = node.layer
    return [ctx.call(rt.caffe_mvn, xs[0], bool(attr(a, "normalize_variance", True)),
                     bool(attr(a, "across_channels", False)), float(attr(a, "eps", 1e-9)))]


@lowering("Softmax")
def _softmax(ctx: LoweringContext, node: Node, xs: list[fx.Node]) -> list[fx.Node]:
    axis = common.canonical_axis(int(attr(node.layer, "axis", 1)), ctx.ndim(node))
    return [ctx.call(torch.softmax, xs[0], axis)]


# -- scale and bias ---------------------------------------------------------------------------
def _factor_shape(ctx: LoweringContext, node: Node) -> tuple[int, tuple[int, ...]]:
    shapes = ctx.bottom_shapes(node)
    if shapes[0] is None:
        raise NetError(f"layer {node.layer.name!r}: the input shape is unknown; give "
                       "input_shapes to to_torch")
    b = shapes[0]
    if len(node.inputs) > 1:
        other = shapes[1]
        assert other is not None
        axis, _ = common.scale_axes(node.layer, len(b), len(other))
        return axis, tuple(other)
    num_axes = int(attr(node.layer, "num_axes", 1))
    axis = common.canonical_axis(int(attr(node.layer, "axis", 1)), len(b)) if b else 0
    end = len(b) if num_axes == -1 else axis + num_axes
    return axis, tuple(b[axis:end])


@lowering("Scale")
def _scale(ctx: LoweringContext, node: Node, xs: list[fx.Node]) -> list[fx.Node]:
    axis, fshape = _factor_shape(ctx, node)
    bias = bool(attr(node.layer, "bias_term", False))
    if len(xs) > 1:
        mod2 = rt.CaffeScale2(fshape, axis, bias)
        name = ctx.add_module(node, mod2)
        if bias:
            ctx.set_param(node, name, "bias", 0, ctx.blob(node, 0, fshape))
        return [ctx.call_module(name, [xs[0], xs[1]])]
    mod = rt.CaffeScale(fshape, axis, bias)
    name = ctx.add_module(node, mod)
    ctx.set_param(node, name, "weight", 0, ctx.blob(node, 0, fshape))
    if bias:
        ctx.set_param(node, name, "bias", 1, ctx.blob(node, 1, fshape))
    return [ctx.call_module(name, [xs[0]])]


@lowering("Bias")
def _bias(ctx: LoweringContext, node: Node, xs: list[fx.Node]) -> list[fx.Node]:
    axis, fshape = _factor_shape(ctx, node)
    if len(xs) > 1:
        return [ctx.call(rt.caffe_bias2, xs[0], xs[1], axis)]
    name = ctx.add_module(node, rt.CaffeBias(fshape, axis))
    ctx.set_param(node, name, "bias", 0, ctx.blob(node, 0, fshape))
    return [ctx.call_module(name, [xs[0]])]


# -- multi-blob layers ------------------------------------------------------------------------
@lowering("Eltwise")
def _eltwise(ctx: LoweringContext, node: Node, xs: list[fx.Node]) -> list[fx.Node]:
    op, coeff = common.eltwise_facts(node.layer)
    if op == "PROD":
        return [ctx.call(rt.caffe_eltwise_prod, list(xs))]
    if op == "MAX":
        return [ctx.call(rt.caffe_eltwise_max, list(xs))]
    if all(c == 1.0 for c in coeff):
        y = xs[0]
        for x in xs[1:]:
            y = ctx.call(operator.add, y, x)
        return [y]
    return [ctx.call(rt.caffe_eltwise_sum, list(xs), coeff)]


def _join_axis(ctx: LoweringContext, node: Node, legacy: str) -> int:
    if legacy in node.layer.attrs:
        return int(node.layer.attrs[legacy])
    return common.canonical_axis(int(attr(node.layer, "axis", 1)), ctx.ndim(node))


@lowering("Concat")
def _concat(ctx: LoweringContext, node: Node, xs: list[fx.Node]) -> list[fx.Node]:
    if len(xs) == 1:
        return [xs[0]]
    return [ctx.call(torch.cat, list(xs), _join_axis(ctx, node, "concat_dim"))]


@lowering("Slice")
def _slice(ctx: LoweringContext, node: Node, xs: list[fx.Node]) -> list[fx.Node]:
    shape = ctx.shape(node.inputs[0])
    if shape is None:
        raise NetError(f"layer {node.layer.name!r}: the input shape is unknown")
    axis = _join_axis(ctx, node, "slice_dim")
    sizes = common.slice_points(node.layer, shape[axis], len(node.layer.tops))
    return ctx.split(ctx.call(rt.caffe_slice, xs[0], axis, sizes), len(sizes))


@lowering("Split")
def _split(ctx: LoweringContext, node: Node, xs: list[fx.Node]) -> list[fx.Node]:
    return [xs[0]] * len(node.layer.tops)


@lowering("Flatten")
def _flatten(ctx: LoweringContext, node: Node, xs: list[fx.Node]) -> list[fx.Node]:
    nd = ctx.ndim(node)
    start = common.canonical_axis(int(attr(node.layer, "axis", 1)), nd)
    end = common.canonical_axis(int(attr(node.layer, "end_axis", -1)), nd)
    return [ctx.call(torch.flatten, xs[0], start, end)]


@lowering("Reshape")
def _reshape(ctx: LoweringContext, node: Node, xs: list[fx.Node]) -> list[fx.Node]:
    shape = attr(node.layer, "shape", {}) or {}
    dims = tuple(int(d) for d in shape.get("dim", []))
    return [ctx.call(rt.caffe_reshape, xs[0], dims, int(attr(node.layer, "axis", 0)),
                     int(attr(node.layer, "num_axes", -1)))]


@lowering("Crop")
def _crop(ctx: LoweringContext, node: Node, xs: list[fx.Node]) -> list[fx.Node]:
    axis, offsets = common.crop_offsets(node.layer, ctx.ndim(node))
    return [ctx.call(rt.caffe_crop, xs[0], xs[1], axis, offsets)]


@lowering("Tile")
def _tile(ctx: LoweringContext, node: Node, xs: list[fx.Node]) -> list[fx.Node]:
    axis = common.canonical_axis(int(attr(node.layer, "axis", 1)), ctx.ndim(node))
    return [ctx.call(rt.caffe_tile, xs[0], axis, int(attr(node.layer, "tiles", 1)))]


@lowering("Permute")
def _permute(ctx: LoweringContext, node: Node, xs: list[fx.Node]) -> list[fx.Node]:
    order = common.permute_order(node.layer, ctx.ndim(node))
    if order == list(range(len(order))):
        return [xs[0]]
    return [ctx.call(torch.permute, xs[0], tuple(order))]


@lowering("ArgMax")
def _argmax(ctx: LoweringContext, node: Node, xs: list[fx.Node]) -> list[fx.Node]:
    a = node.layer
    axis = None
    if "axis" in a.attrs:
        axis = common.canonical_axis(int(a.attrs["axis"]), ctx.ndim(node))
    return [ctx.call(rt.caffe_argmax, xs[0], int(attr(a, "top_k", 1)),
                     bool(attr(a, "out_max_val", False)), axis)]


@lowering("Reduction")
def _reduction(ctx: LoweringContext, node: Node, xs: list[fx.Node]) -> list[fx.Node]:
    a = node.layer
    axis = common.canonical_axis(int(attr(a, "axis", 0)), ctx.ndim(node))
    return [ctx.call(rt.caffe_reduction, xs[0], str(attr(a, "operation", "SUM")), axis,
                     float(attr(a, "coeff", 1.0)))]


@lowering("Upsample")
def _upsample(ctx: LoweringContext, node: Node, xs: list[fx.Node]) -> list[fx.Node]:
    out = ctx.plan.shapes.tops(node)[0] if ctx.plan.shapes is not None else None
    if out is None:
        raise NetError(f"layer {node.layer.name!r}: the input shape is unknown")
    size = (int(out[2]), int(out[3]))
    if len(xs) > 1:
        return [ctx.call(rt.caffe_unpool, xs[0], xs[1], size)]
    return [ctx.call(rt.caffe_upsample_nearest, xs[0], size)]


@lowering("Interp")
def _interp(ctx: LoweringContext, node: Node, xs: list[fx.Node]) -> list[fx.Node]:
    out = ctx.plan.shapes.tops(node)[0] if ctx.plan.shapes is not None else None
    if out is None:
        raise NetError(f"layer {node.layer.name!r}: the input shape is unknown")
    return [ctx.call(rt.caffe_interp, xs[0], (int(out[2]), int(out[3])),
                     int(attr(node.layer, "pad_beg", 0)), int(attr(node.layer, "pad_end", 0)))]


@lowering("ShuffleChannel")
def _shuffle_channel(ctx: LoweringContext, node: Node, xs: list[fx.Node]) -> list[fx.Node]:
    group = int(attr(node.layer, "group", 1))
    if group == 1:
        return [xs[0]]
    return [ctx.call(rt.caffe_shuffle_channel, xs[0], group)]


@lowering("Axpy")
def _axpy(ctx: LoweringContext, node: Node, xs: list[fx.Node]) -> list[fx.Node]:
    # SENet fork: top = a * x + y, a of shape (N, C, 1, 1)
    return [ctx.call(rt.caffe_axpy, xs[0], xs[1], xs[2])]


@lowering("PriorBox")
def _prior_box(ctx: LoweringContext, node: Node, xs: list[fx.Node]) -> list[fx.Node]:
    shapes = ctx.bottom_shapes(node)
    if shapes[0] is None or (len(shapes) > 1 and shapes[1] is None):
        raise NetError(f"layer {node.layer.name!r}: PriorBox needs the input size at export "
                       "time; give input_shapes to to_torch")
    feat = shapes[0]
    img = shapes[1] if len(shapes) > 1 else (0, 0, 0, 0)
    assert feat is not None and img is not None
    priors = common.prior_boxes(node.layer, feat[2:4], img[2:4])
    return [ctx.constant(node, priors, "priors")]


def _detection_output(ctx: LoweringContext, node: Node, xs: list[fx.Node]) -> list[fx.Node]:
    """SSD DetectionOutput (opt-in, ``to_torch(..., detection_output=True)``): decode, per-class
    NMS and keep_top_k in :func:`~surgery.export._torch_runtime.caffe_detection_output`.
    Kept out of ``_TABLE``: ONNX does not lower it, and the default export cuts before it."""
    f = common.detection_output_facts(node.layer)
    if f["num_classes"] <= 0:
        raise NetError(f"layer {node.layer.name!r}: DetectionOutput needs num_classes")
    code = f["code_type"]
    code = rt.CAFFE_CODE_TYPES.get(int(code), code) if str(code).isdigit() else str(code)
    if code not in rt.CAFFE_CODE_TYPES.values():
        raise UnsupportedLayerError(f"layer {node.layer.name!r}: code_type {code!r}")
    if not 0.0 < f["eta"] <= 1.0 or f["nms_threshold"] < 0.0:
        raise NetError(f"layer {node.layer.name!r}: Caffe needs 0 < eta <= 1 and "
                       "nms_threshold >= 0")
    return [ctx.call(rt.caffe_detection_output, xs[0], xs[1], xs[2],
                     num_classes=f["num_classes"], share_location=f["share_location"],
                     background_label_id=f["background_label_id"], code_type=code,
                     variance_encoded_in_target=f["variance_encoded_in_target"],
                     keep_top_k=f["keep_top_k"],
                     confidence_threshold=f["confidence_threshold"],
                     nms_threshold=f["nms_threshold"], top_k=f["top_k"], eta=f["eta"])]


# Lowerings outside the table (opt-in; not part of torch_supported_types()).
_OPT_IN: dict[str, Lowering] = {"DetectionOutput": _detection_output}


def _accuracy(ctx: LoweringContext, node: Node, xs: list[fx.Node]) -> list[fx.Node]:
    if len(node.layer.tops) > 1:
        raise UnsupportedLayerError(f"layer {node.layer.name!r}: Accuracy's per-class second "
                                    "top is not lowered")
    axis = common.canonical_axis(int(attr(node.layer, "axis", 1)), ctx.ndim(node))
    ignore = node.layer.attrs.get("ignore_label")  # no default: unset means none ignored
    return [ctx.call(rt.caffe_accuracy, xs[0], xs[1], int(attr(node.layer, "top_k", 1)), axis,
                     None if ignore is None else int(ignore))]


# Metric layers, lowered only with metrics=True (training's test nets).
_METRICS: dict[str, Lowering] = {"Accuracy": _accuracy}


# -- losses (TRAIN) ---------------------------------------------------------------------------
@lowering("SoftmaxWithLoss")
def _softmax_loss(ctx: LoweringContext, node: Node, xs: list[fx.Node]) -> list[fx.Node]:
    axis = common.canonical_axis(int(attr(node.layer, "axis", 1)), ctx.ndim(node))
    ignore, norm = common.loss_facts(node.layer)
    out = [ctx.call(rt.caffe_softmax_loss, xs[0], xs[1], axis, ignore, norm)]
    if len(node.layer.tops) > 1:
        out.append(ctx.call(torch.softmax, xs[0], axis))
    return out


@lowering("EuclideanLoss")
def _euclidean_loss(ctx: LoweringContext, node: Node, xs: list[fx.Node]) -> list[fx.Node]:
    return [ctx.call(rt.caffe_euclidean_loss, xs[0], xs[1])]


@lowering("SigmoidCrossEntropyLoss")
def _sigmoid_ce_loss(ctx: LoweringContext, node: Node, xs: list[fx.Node]) -> list[fx.Node]:
    ignore, norm = common.loss_facts(node.layer)
    return [ctx.call(rt.caffe_sigmoid_ce_loss, xs[0], xs[1], ignore, norm)]


# -- building the module ----------------------------------------------------------------------
class _Root(nn.Module):
    pass


#: The attributes :func:`to_torch` sets on its module (see its Returns).
_EXPORT_ATTRS = ("caffe_names", "caffe_lr", "input_names", "output_names", "loss_weights",
                 "total_loss_key", "notes", "caffe_phase", "input_shapes")


class _CaffeGraphModule(fx.GraphModule):
    """A GraphModule whose ``copy.deepcopy`` keeps :data:`_EXPORT_ATTRS` (fx's own rebuilds
    the module from its graph and drops plain attributes: a copy, e.g. for an EMA, would lose
    ``caffe_lr`` and train every blob at lr_mult 1)."""

    def __deepcopy__(self, memo: dict[int, Any]) -> fx.GraphModule:
        res = super().__deepcopy__(memo)
        for name in _EXPORT_ATTRS:
            if name in self.__dict__:
                setattr(res, name, copy.deepcopy(self.__dict__[name], memo))
        return res


def _check_weights(plan: common.ExportPlan) -> None:
    missing: list[str] = []
    for node in plan.nodes:
        lay = node.layer
        if lay.type not in LEARNABLE_TYPES:
            continue
        expected = plan.shapes.params(node) if plan.shapes is not None else None
        n = len(expected) if expected else len(lay.params)
        if lay.type in ("Scale", "Bias") and len(lay.bottoms) > 1 and not expected:
            n = len(lay.params)
        if n == 0 and lay.type not in ("Scale", "Bias"):
            n = 1
        blobs = [p.data for p in lay.params]
        if len(blobs) < n or any(b is None for b in blobs[:n]):
            missing.append(f"{lay.name!r} ({lay.type})")
    if missing:
        raise NetError(
            f"{len(missing)} layer(s) have no weights: {', '.join(missing)}. Load a caffemodel "
            "with these layer names, or export with missing='fill' to initialise them from "
            "their fillers (seeded)."
        )


def _renamed(graph: fx.Graph, wanted: Mapping[fx.Node, str]) -> fx.Graph:
    """A copy of ``graph`` whose nodes take the ``wanted`` names (fx dedupes with ``_1``...).

    Renaming in place would keep fx's first automatic names reserved (``conv1_1`` for the
    module ``conv1_1``), so a blob ``conv1_1`` would print as ``conv1_3``.
    """
    new = fx.Graph()
    remap: dict[fx.Node, fx.Node] = {}
    for n in graph.nodes:
        args = fx.map_arg(n.args, lambda a: remap[a])
        kwargs = fx.map_arg(n.kwargs, lambda a: remap[a])
        name = n.name if n.op in ("placeholder", "output") else wanted.get(n, n.name)
        remap[n] = new.create_node(n.op, n.target, args, kwargs, name=name, type_expr=n.type)
    return new


def _blob_key(plan: common.ExportPlan, value: Value) -> str:
    """The blob name for the last version of a name (Caffe's view after a forward pass),
    ``<blob>@<layer>`` for earlier in-place versions."""
    if plan.flow.latest(value.name) is value:
        return value.name
    return f"{value.name}@{value.producer.layer.name}"


def to_torch(
    net: Net,
    phase: str | NetState = "test",
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    *,
    keep_blobs: bool = False,
    missing: str = "error",
    seed: int = 0,
    detection_output: bool = False,
    outputs: Sequence[str] | None = None,
    lower_losses: bool | None = None,
    metrics: bool = False,
) -> fx.GraphModule:
    """Export ``net`` to a ``torch.fx.GraphModule`` computing what Caffe computes.

    Args:
        net: the net (weights loaded, or ``missing='fill'``).
        phase: ``"test"`` or ``"train"`` (or a :class:`NetState`): which layers are included;
            the module starts in ``eval()`` for TEST and ``train()`` for TRAIN. In TRAIN the
            loss layers are lowered and the total weighted loss is returned.
        input_shapes: shapes by input (top) name; default: the ``Input`` layers' shapes. Needed
            for layers whose parameters depend on the input size and for PriorBox.
        keep_blobs: return every blob in a dict: the last version of each name under the
            name (Caffe's in-place view), earlier in-place versions as ``<blob>@<layer>``.
        missing: ``"error"`` (default) raises one error naming every layer without weights;
            ``"fill"`` initialises them from their fillers with ``seed`` (Caffe's rules).
        seed: the seed for ``missing='fill'``.
        detection_output: lower SSD's ``DetectionOutput`` (decode + per-class NMS +
            keep_top_k, Caffe's CPU semantics) so the module returns Caffe's
            ``(1, 1, kept, 7)`` detections; default False: the export stops before it and its
            bottoms (``mbox_loc``, ``mbox_conf_flatten``, ``mbox_priorbox``) are outputs.
        outputs: blob names to return instead of the net's outputs; the module then always
            returns a dict ``{name: tensor}`` (one name included). A name is the blob's last
            version, Caffe's value after the forward pass (``fc7`` after an in-place
            ``relu7``); ``<blob>@<layer>`` is the version ``<layer>`` wrote. Only the layers
            the outputs depend on are exported (and need weights). In TRAIN no loss is added.
        lower_losses: lower the loss layers (default: in TRAIN only); a TEST net lowered with
            them returns its losses and ``total_loss`` as Caffe's test nets do.
        metrics: lower ``Accuracy`` layers too (Caffe's semantics: top_k, axis, ignore_label).

    Returns:
        The module, with ``caffe_names`` (module/parameter/buffer name -> ``{"layer",
        "blob"}``), ``caffe_lr`` (parameter name -> ``(lr_mult, decay_mult)``),
        ``input_names``, ``output_names``, ``loss_weights``, ``total_loss_key`` and
        ``notes`` (what was dropped).

    Raises:
        UnsupportedLayerError: layers without a lowering, or configurations a lowering
            refuses (each kind all named at once).
        NetError: missing weights (all named at once), or an input shape needed but unknown.
        ShapeMismatchError: weights or shapes Caffe would refuse.
    """
    if missing not in ("error", "fill"):
        raise ValueError("missing must be 'error' or 'fill'")
    table: dict[str, Lowering] = dict(_TABLE)
    if detection_output:
        table.update(_OPT_IN)
    if outputs is not None:
        outputs = list(dict.fromkeys(outputs))
    if metrics:
        table.update(_METRICS)
    plan = common.plan(net, phase, supported=table, input_shapes=input_shapes,
                       lower_detection_output=detection_output, outputs=outputs,
                       lower_losses=lower_losses, lower_metrics=metrics)
    if missing == "error":
        _check_weights(plan)
    root = _Root()
    graph = fx.Graph()
    ctx = LoweringContext(graph, root, plan, missing=missing, rng=np.random.default_rng(seed),
                          keep_blobs=keep_blobs)
    env: dict[int, fx.Node] = {}
    placeholder_taken: set[str] = set()
    for v in plan.inputs:
        pname = common.py_identifier(v.name, placeholder_taken | ctx._taken, prefix="in_")
        placeholder_taken.add(pname)
        env[id(v)] = graph.placeholder(pname)
    refused: list[str] = []  # configurations a lowering refuses, all named in one error
    for node in plan.nodes:
        xs = [env[id(v)] for v in node.inputs]
        try:
            outs = table[node.layer.type](ctx, node, xs)
        except UnsupportedLayerError as exc:
            refused.append(str(exc))
            stand_in = xs[0] if xs else graph.placeholder(f"refused_{len(refused)}")
            outs = [stand_in] * len(node.outputs)  # lets the later lowerings run and report
        if len(outs) != len(node.outputs):
            raise NetError(f"layer {node.layer.name!r}: lowering gave {len(outs)} tops, "
                           f"expected {len(node.outputs)}")
        for v, o in zip(node.outputs, outs, strict=True):
            env[id(v)] = o
    if refused:
        raise UnsupportedLayerError(
            f"{len(refused)} layer(s) use a configuration the PyTorch export does not "
            f"support: {'; '.join(refused)}. Change these layers (surgery can edit the net)."
        )
    # fx nodes are named after the tops they compute, in-place versions after their layer
    # (``relu1 = torch.relu_(conv1)``), for a readable .code; see _renamed.
    wanted: dict[fx.Node, str] = {}
    for node in plan.nodes:
        for v in node.outputs:
            o = env[id(v)]
            if o.op != "placeholder" and o not in wanted:
                base = v.name if v.version == 0 else node.layer.name
                wanted[o] = common.py_identifier(base, prefix="b_")
    result: dict[str, fx.Node] = {}
    if keep_blobs:
        for v in plan.inputs:
            result[v.name] = env[id(v)]
        for node in plan.nodes:
            for v in node.outputs:
                result[_blob_key(plan, v)] = env[id(v)]
    if outputs is not None:
        result = {}
    for name, v in zip(outputs or [v.name for v in plan.outputs], plan.outputs, strict=True):
        result[name] = env[id(v)]
    loss_weights = {v.name: w for v, w in plan.losses}
    total_key = "total_loss"
    i = 1
    while total_key in result:
        total_key = f"total_loss_{i}"
        i += 1
    if plan.losses and outputs is None:
        result[total_key] = graph.call_function(
            rt.caffe_weighted_sum, ([env[id(v)] for v, _ in plan.losses],
                                    [w for _, w in plan.losses]))
    if len(result) == 1 and not keep_blobs and not plan.losses and outputs is None:
        graph.output(next(iter(result.values())))
    else:
        graph.output(result)
    graph = _renamed(graph, wanted)
    graph.lint()
    gm = _CaffeGraphModule(root, graph, class_name="CaffeNet")
    gm.caffe_names = ctx.caffe_names
    gm.caffe_lr = ctx.lr
    gm.input_names = [v.name for v in plan.inputs]
    gm.input_shapes = {v.name: plan.input_shape(v) for v in plan.inputs}
    gm.output_names = list(result)
    gm.loss_weights = loss_weights
    gm.total_loss_key = total_key if plan.losses and outputs is None else None
    gm.notes = list(plan.notes)
    gm.caffe_phase = plan.phase
    gm.train(plan.phase == "TRAIN")
    return gm


def run_blobs(
    gm: nn.Module, inputs: Mapping[str, Any] | Sequence[Any]
) -> dict[str, np.ndarray]:
    """Run a module from :func:`to_torch` and return its outputs as numpy arrays by blob name.

    For every blob use ``to_torch(..., keep_blobs=True)``: the dict then holds the last version
    of each blob name (Caffe's in-place semantics).

    Args:
        gm: the exported module.
        inputs: arrays by input name (Caffe top names) or in ``gm.input_names`` order.
    """
    names = list(getattr(gm, "input_names", []))
    if isinstance(inputs, Mapping):
        args = [torch.as_tensor(np.asarray(inputs[n])) for n in names]
    else:
        args = [torch.as_tensor(np.asarray(x)) for x in inputs]
    with torch.no_grad():
        out = gm(*args)
    if isinstance(out, torch.Tensor):
        out = {gm.output_names[0]: out}
    return {k: v.detach().float().cpu().numpy() for k, v in out.items()}


# -- standalone source ------------------------------------------------------------------------
_RESERVED = {"self", "torch", "nn", "F", "math", "operator", "inputs", "out", "forward"}
_TORCH_NAMES: dict[Any, str] = {
    torch.relu: "torch.relu",
    torch.relu_: "torch.relu_",
    torch.sigmoid: "torch.sigmoid",
    torch.tanh: "torch.tanh",
    torch.abs: "torch.abs",
    torch.clamp: "torch.clamp",
    torch.softmax: "torch.softmax",
    torch.cat: "torch.cat",
    torch.flatten: "torch.flatten",
    torch.permute: "torch.permute",
    nn.functional.leaky_relu: "F.leaky_relu",
    nn.functional.elu: "F.elu",
    operator.add: "operator.add",
    operator.mul: "operator.mul",
    operator.getitem: "operator.getitem",
}
_SAFE_MODULES = {
    nn.Conv1d: "nn.Conv1d", nn.Conv2d: "nn.Conv2d", nn.Conv3d: "nn.Conv3d",
    nn.ConvTranspose1d: "nn.ConvTranspose1d", nn.ConvTranspose2d: "nn.ConvTranspose2d",
    nn.ConvTranspose3d: "nn.ConvTranspose3d", nn.Linear: "nn.Linear", nn.PReLU: "nn.PReLU",
    nn.Dropout: "nn.Dropout",
}


def _lit(v: Any) -> str:
    """A Python literal for a constant argument (never an interpolated name)."""
    if v is None or isinstance(v, bool):
        return repr(v)
    if isinstance(v, int):
        return repr(int(v))
    if isinstance(v, float):
        if math.isnan(v):
            return "float('nan')"
        if math.isinf(v):
            return "float('inf')" if v > 0 else "float('-inf')"
        return repr(float(v))
    if isinstance(v, str):
        return repr(v)
    if isinstance(v, tuple):
        inner = ", ".join(_lit(x) for x in v)
        return f"({inner},)" if len(v) == 1 else f"({inner})"
    if isinstance(v, list):
        return "[" + ", ".join(_lit(x) for x in v) + "]"
    raise TypeError(f"cannot write constant of type {type(v).__name__}")


def _module_ctor(mod: nn.Module) -> str:
    """Constructor source for a submodule (shapes only; values come from the weights file)."""
    if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                        nn.ConvTranspose3d)):
        return (f"{_SAFE_MODULES[type(mod)]}({mod.in_channels}, {mod.out_channels}, "
                f"{_lit(tuple(mod.kernel_size))}, stride={_lit(tuple(mod.stride))}, "
                f"padding={_lit(tuple(mod.padding))}, dilation={_lit(tuple(mod.dilation))}, "
                f"groups={mod.groups}, bias={mod.bias is not None})")
    if isinstance(mod, nn.Linear):
        return f"nn.Linear({mod.in_features}, {mod.out_features}, bias={mod.bias is not None})"
    if isinstance(mod, nn.PReLU):
        return f"nn.PReLU({mod.num_parameters})"
    if isinstance(mod, nn.Dropout):
        return f"nn.Dropout({_lit(float(mod.p))})"
    if isinstance(mod, rt.CaffeBatchNorm):
        return (f"CaffeBatchNorm({mod.running_mean.numel()}, eps={_lit(float(mod.eps))}, "
                f"momentum={_lit(float(mod.momentum))}, "
                f"use_global_stats={_lit(mod.use_global_stats)}, "
                f"factor={_lit(float(mod.caffe_factor))})")
    if isinstance(mod, rt.CaffeBN):
        return (f"CaffeBN({mod.weight.numel()}, {_lit(mod.mode)}, eps={_lit(float(mod.eps))}, "
                f"momentum={_lit(float(mod.momentum))}, frozen={_lit(mod.frozen)})")
    if isinstance(mod, (rt.CaffeScale, rt.CaffeScale2)):
        shape = tuple(mod.weight.shape) if isinstance(mod, rt.CaffeScale) else (
            tuple(mod.bias.shape) if mod.bias is not None else ())
        return (f"{type(mod).__name__}({_lit(tuple(int(d) for d in shape))}, {mod.axis}, "
                f"{mod.bias is not None})")
    if isinstance(mod, rt.CaffeBias):
        return f"CaffeBias({_lit(tuple(int(d) for d in mod.bias.shape))}, {mod.axis})"
    if isinstance(mod, rt.CaffeNormalize):
        return (f"CaffeNormalize({mod.weight.numel()}, {mod.across_spatial}, "
                f"{_lit(float(mod.eps))})")
    if isinstance(mod, rt.CaffeInnerProduct):
        k, n = mod.weight.shape
        return f"CaffeInnerProduct({k}, {n}, {mod.bias is not None})"
    raise TypeError(f"no source for module {type(mod).__name__}")


def generate_source(gm: fx.GraphModule, class_name: str = "CaffeNet",
                    preprocess: Mapping[str, Any] | None = None) -> str:
    """Standalone Python source of ``gm``: a readable ``nn.Module`` needing only torch.

    Caffe names appear only inside ``repr()`` string literals; identifiers are the sanitized
    module and value names (checked with ``str.isidentifier``), so any layer name is safe.
    With ``preprocess`` (:meth:`PreprocessSpec.to_json`) the file also defines
    ``preprocess(images, layout=None, pixel_range=None)``, reading a mean image from
    ``preprocess.json`` beside it.
    """
    if not class_name.isidentifier():
        raise ValueError("class_name must be an identifier")
    runtime = inspect.getsource(rt)
    runtime_names = {n for n, _ in inspect.getmembers(rt) if n.startswith(("caffe_", "Caffe",
                                                                          "CAFFE_"))}
    reserved = _RESERVED | runtime_names | {"float", "param_groups", "set_trainable",
                                            "freeze_bn", "load_weights", class_name,
                                            "preprocess", "PREPROCESS", "_PREPROCESS_MEAN"}
    names: dict[fx.Node, str] = {}
    taken: set[str] = set(reserved)

    def var(n: fx.Node) -> str:
        if n not in names:
            base = n.name if n.name.isidentifier() else "v"
            names[n] = common.py_identifier(base, taken, prefix="v_")
            taken.add(names[n])
        return names[n]

    def arg(a: Any) -> str:
        if isinstance(a, fx.Node):
            return var(a)
        if isinstance(a, (list, tuple)) and any(isinstance(x, fx.Node) for x in a):
            inner = ", ".join(arg(x) for x in a)
            return f"[{inner}]" if isinstance(a, list) else f"({inner},)"
        return _lit(a)

    def attr_path(target: str) -> str:
        parts = target.split(".")
        if not all(p.isidentifier() and not p.startswith("__") for p in parts):
            raise ValueError(f"unsafe attribute path {target!r}")
        return "self." + ".".join(parts)

    lines_init: list[str] = []
    for mname, mod in gm.named_children():
        if not mname.isidentifier():
            raise ValueError(f"unsafe module name {mname!r}")
        lines_init.append(f"        self.{mname} = {_module_ctor(mod)}")
    for bname, buf in gm.named_buffers(recurse=False):
        lines_init.append(
            f"        self.register_buffer({bname!r}, torch.zeros({_lit(tuple(buf.shape))}))")
    ties: list[str] = []
    seen: dict[int, str] = {}
    for pname, p in gm.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            ties.append(f"        {attr_path(pname)} = {attr_path(seen[id(p)])}")
        else:
            seen[id(p)] = pname
    frozen = [n for n, p in gm.named_parameters() if not p.requires_grad]
    body: list[str] = []
    params: list[str] = []
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            params.append(var(n))
        elif n.op == "get_attr":
            body.append(f"        {var(n)} = {attr_path(n.target)}")
        elif n.op == "call_module":
            args = ", ".join(arg(a) for a in n.args)
            body.append(f"        {var(n)} = {attr_path(n.target)}({args})")
        elif n.op == "call_function":
            if n.target in _TORCH_NAMES:
                fname = _TORCH_NAMES[n.target]
            elif getattr(n.target, "__module__", None) == rt.__name__:
                fname = n.target.__name__
                assert fname in runtime_names
            else:
                raise ValueError(f"no source name for {n.target!r}")
            args = [arg(a) for a in n.args] + [f"{k}={arg(v)}" for k, v in n.kwargs.items()]
            body.append(f"        {var(n)} = {fname}({', '.join(args)})")
        elif n.op == "output":
            res = n.args[0]
            if isinstance(res, dict):
                items = ", ".join(f"{k!r}: {arg(v)}" for k, v in res.items())
                body.append(f"        return {{{items}}}")
            else:
                body.append(f"        return {arg(res)}")
    lr = {k: tuple(v) for k, v in getattr(gm, "caffe_lr", {}).items()}
    caffe_names = getattr(gm, "caffe_names", {})
    out = [
        '"""Generated by caffe-surgery (surgery export torch). Needs only torch.',
        "",
        "Load with::",
        "",
        f"    model = {class_name}()",
        "    model.load_weights('weights.safetensors')",
        '"""',
        "",
        "# ---- runtime (copied from surgery/export/_torch_runtime.py) ----",
        _strip_docstring(runtime),
        "",
        "import operator  # noqa: E402",
        "",
        f"INPUT_NAMES = {_lit(list(getattr(gm, 'input_names', [])))}",
        f"OUTPUT_NAMES = {_lit(list(getattr(gm, 'output_names', [])))}",
        "LOSS_WEIGHTS = {"
        + ", ".join(f"{k!r}: {_lit(float(v))}" for k, v in getattr(gm, "loss_weights", {}).items())
        + "}",
        "",
        "",
        f"class {class_name}(nn.Module):",
        '    """The exported Caffe net; ``forward`` mirrors the Caffe layers in order."""',
        "",
        "    # parameter -> (lr_mult, decay_mult), from the Caffe param { } specs",
        "    CAFFE_LR = {",
        *[f"        {k!r}: {_lit(v)}," for k, v in lr.items()],
        "    }",
        "    # parameter/buffer -> its Caffe layer and blob index",
        "    CAFFE_NAMES = {",
        *[f"        {k!r}: {{" + ", ".join(f"{a!r}: {_lit(b)}" for a, b in v.items()) + "},"
          for k, v in caffe_names.items()],
        "    }",
        f"    CAFFE_PHASE = {getattr(gm, 'caffe_phase', 'TEST')!r}",
        "",
        "    def __init__(self) -> None:",
        "        super().__init__()",
        *lines_init,
        *ties,
        f"        for _name in {_lit(frozen)}:",
        "            self.get_parameter(_name).requires_grad_(False)",
        "        self.train(self.CAFFE_PHASE == 'TRAIN')",
        "        self.caffe_lr = dict(self.CAFFE_LR)  # set_trainable edits this copy",
        "        self.caffe_names = dict(self.CAFFE_NAMES)",
        "",
        "    def load_weights(self, path: str) -> None:",
        '        """Load weights.safetensors (shared blobs are stored once)."""',
        "        from safetensors.torch import load_model",
        "",
        "        load_model(self, path)",
        "",
        f"    def forward(self, {', '.join(params)}):",
        *body,
        "",
        "",
        "def param_groups(model: nn.Module, base_lr: float, weight_decay: float = 0.0) -> list:",
        '    """Optimizer groups: lr * lr_mult, weight_decay * decay_mult, following the',
        "    current requires_grad (a blob frozen in Caffe, made trainable, gets 1/1).\"\"\"",
        "    return caffe_param_groups(model, base_lr, weight_decay)",
        "",
        "",
        "def set_trainable(model: nn.Module, layers=None, trainable: bool = True, lr_mult=None,",
        "                  decay_mult=None, except_=None) -> list:",
        '    """Stage 2 of freeze-then-unfreeze: see caffe_set_trainable."""',
        "    return caffe_set_trainable(model, layers, trainable, lr_mult, decay_mult, except_)",
        "",
        "",
        "def freeze_bn(model: nn.Module, layers=None, fixed: bool = True) -> list:",
        '    """BatchNorm statistics fixed under model.train(): see caffe_freeze_bn."""',
        "    return caffe_freeze_bn(model, layers, fixed)",
        "",
        *(_preprocess_source(preprocess) if preprocess is not None else []),
    ]
    src = "\n".join(out)
    compile(src, "model.py", "exec")  # never write source that does not parse
    return src


def _json_lit(v: Any) -> str:
    """A Python literal for JSON data (dict keys and strings through ``repr``)."""
    if isinstance(v, dict):
        return "{" + ", ".join(f"{str(k)!r}: {_json_lit(x)}" for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_json_lit(x) for x in v) + "]"
    return _lit(v)


def _preprocess_source(spec: Mapping[str, Any]) -> list[str]:
    """``preprocess(images)`` for model.py: the copied :mod:`._torch_preprocess` source, the
    spec as a literal (the mean image's values stay in preprocess.json) and a thin wrapper."""
    from . import _torch_preprocess as tp

    body = _strip_docstring(inspect.getsource(tp))
    body = "\n".join(ln for ln in body.splitlines()
                     if ln not in ("from __future__ import annotations", "import torch"))
    spec = dict(spec)
    if spec.get("mean_image"):
        spec["mean_image"] = {k: v for k, v in spec["mean_image"].items() if k != "base64"}
    return [
        "",
        "# ---- preprocessing (copied from surgery/export/_torch_preprocess.py) ----",
        body.strip("\n"),
        "",
        "",
        "# The steps from an RGB image to the net input (PREPROCESS['steps'] says them in words);",
        "# preprocess.json holds the same, and the mean image's values when there is one.",
        f"PREPROCESS = {_json_lit(spec)}",
        "_PREPROCESS_MEAN: list = []",
        "",
        "",
        "def preprocess(images, layout=None, pixel_range=None):",
        '    """RGB images -> exactly the input Caffe expects (for PREPROCESS["input"]).',
        "",
        "    images: a tensor or array, uint8 0-255 or float 0-1 (pixel_range=255 or 1",
        "    overrides): one HWC image, or an NHWC or NCHW batch (3-D is HWC; 4-D is told apart",
        "    by which axis has the channel count; layout='HWC'|'CHW'|'NHWC'|'NCHW' overrides).",
        "    Returns the NCHW float32 tensor: float, RGB->BGR when the net reads BGR, x255 for",
        "    0-1 input, centre crop, minus the mean (image or values), times the scale.",
        '    """',
        "    if PREPROCESS['mean_image'] and not _PREPROCESS_MEAN:",
        "        import os",
        "",
        "        here = os.path.dirname(os.path.abspath(__file__))",
        "        _PREPROCESS_MEAN.append(caffe_read_mean(os.path.join(here, 'preprocess.json')))",
        "    mean = _PREPROCESS_MEAN[0] if _PREPROCESS_MEAN else None",
        "    return caffe_preprocess(images, PREPROCESS, mean, layout, pixel_range)",
        "",
    ]


def _strip_docstring(src: str) -> str:
    if src.startswith('"""'):
        end = src.index('"""', 3)
        return src[end + 3 :].lstrip("\n")
    return src


#: The files an export writes; a folder holding only these (and Python's ``__pycache__``) is a
#: previous export that a new one may replace.
EXPORT_FILES = ("model.py", "weights.safetensors", "caffe_names.json", "net.prototxt",
                "preprocess.json")


def previous_export(folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder`` holds nothing but a previous :func:`save_torch` export.

    That is: ``model.py`` and ``caffe_names.json``, optionally ``weights.safetensors`` and
    ``net.prototxt``, and a
    ``__pycache__`` folder holding only ``model.*.pyc`` (left by importing ``model.py``).
    """
    try:
        names = set(os.listdir(folder))
    except OSError:
        return False
    if not {"model.py", "caffe_names.json"} <= names or names - {*EXPORT_FILES, "__pycache__"}:
        return False
    if "__pycache__" in names:
        cache = Path(folder) / "__pycache__"
        try:
            if not cache.is_dir() or cache.is_symlink() or any(
                not (n.startswith("model.") and n.endswith(".pyc")) for n in os.listdir(cache)
            ):
                return False
        except OSError:
            return False
    return all(
        (Path(folder) / n).is_file() and not (Path(folder) / n).is_symlink()
        for n in names - {"__pycache__"}
    )


def check_export_folder(
    out_dir: str | os.PathLike[str],
    inputs: Sequence[str | os.PathLike[str] | None] = (),
    *,
    overwrite: bool = True,
) -> Path:
    """Where :func:`save_torch` may write: refuse anything that would lose a user's files.

    Rules: (1) the current folder or one above it is refused (``-o .``, ``-o ..``); (2) a
    folder that holds an input (``inputs``) is refused; (3) an existing path that is not a
    folder is refused; (4) an existing non-empty folder is replaced only when ``overwrite`` and
    it holds nothing but a previous export (:func:`previous_export`).

    Returns:
        The folder's real path (symbolic links resolved).

    Raises:
        SurgeryError: one of the rules above, naming the folder and what to do.
    """
    given = os.fspath(out_dir)
    out = Path(os.path.realpath(given))
    cwd = Path(os.path.realpath(os.getcwd()))
    if out == cwd or out in cwd.parents:
        raise SurgeryError(
            f"{given}: is the current folder or one above it; an export replaces its folder "
            "as a whole, so name a new folder (e.g. -o model_torch)"
        )
    for src in inputs:
        if src is None:
            continue
        real = Path(os.path.realpath(os.fspath(src)))
        if real == out or out in real.parents:
            raise SurgeryError(
                f"{given}: holds the input {os.fspath(src)}; an export replaces its folder as a "
                "whole, so name a new folder"
            )
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise SurgeryError(f"{given}: exists and is not a folder; name a new folder")
        try:
            empty = not any(os.scandir(out))
        except OSError as exc:
            raise SurgeryError(f"{given}: cannot read: {exc.strerror or exc}") from None
        if not empty and not overwrite:
            raise SurgeryError(f"{given}: exists; pass overwrite=True or choose another folder")
        if not empty and not previous_export(out):
            raise SurgeryError(
                f"{given}: exists and is not a previous export (it holds other files); an "
                "export replaces its folder as a whole, so name a new or empty folder"
            )
    return out


def save_torch(
    net: Net,
    out_dir: str | os.PathLike[str],
    phase: str | NetState = "test",
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    *,
    missing: str = "error",
    seed: int = 0,
    overwrite: bool = True,
    detection_output: bool = False,
    outputs: Sequence[str] | None = None,
    inputs: Sequence[str | os.PathLike[str] | None] = (),
    preprocess: PreprocessSpec | None = None,
) -> Path:
    """Write ``model.py``, ``weights.safetensors``, ``caffe_names.json`` and ``net.prototxt``
    (the definition exported, for ``surgery import-torch``) into ``out_dir``; with
    ``preprocess`` also ``preprocess.json`` and a ``preprocess(images)`` function in
    ``model.py`` (:mod:`surgery.export.preprocess`).

    Everything is written into a temporary folder beside ``out_dir`` and renamed into place
    (:mod:`surgery._atomic`), so a failure or a signal leaves no partial output. An existing
    ``out_dir`` is replaced as a whole, and only when it is empty or a previous export
    (:func:`check_export_folder`): never a folder with other files, one holding the net's own
    files, or the current folder.

    Args:
        net: the net.
        out_dir: the folder to create (or the previous export to replace).
        phase: ``"test"`` or ``"train"``.
        input_shapes: see :func:`to_torch`.
        missing: see :func:`to_torch`.
        seed: see :func:`to_torch`.
        overwrite: replace a previous export in ``out_dir``.
        detection_output: see :func:`to_torch`.
        outputs: see :func:`to_torch` (the module then returns a dict of those blobs).
        inputs: more files the folder must not hold (the net's ``source`` and
            ``weights_source`` are always included).
        preprocess: the steps from RGB images to the net input
            (:func:`surgery.export.preprocess.preprocess_spec`), or None.

    Returns:
        The output folder.

    Raises:
        UnsupportedLayerError, NetError, ShapeMismatchError: as :func:`to_torch`.
        SurgeryError: ``out_dir`` may not be written (see :func:`check_export_folder`), or
            cannot be.
    """
    from safetensors.torch import save_model

    from .. import _atomic
    from ..caffe_io import net_to_text

    sources = [*inputs, net.source, net.weights_source]
    out = check_export_folder(out_dir, sources, overwrite=overwrite)
    gm = to_torch(net, phase, input_shapes, missing=missing, seed=seed,
                  detection_output=detection_output, outputs=outputs)
    pre = None
    if preprocess is not None:
        from .preprocess import check_input

        shapes = getattr(gm, "input_shapes", {}) or {}
        check_input(preprocess, list(gm.input_names), shapes.get(preprocess.input))
        pre = preprocess.to_json()
    src = generate_source(gm, preprocess=pre)
    if not out.parent.is_dir():
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SurgeryError(f"{out_dir}: cannot write: {exc.strerror or exc}") from None
    meta = {
        "caffe_names": gm.caffe_names,
        "lr": {k: list(v) for k, v in gm.caffe_lr.items()},
        "inputs": gm.input_names,
        "outputs": gm.output_names,
        "phase": gm.caffe_phase,
        "notes": gm.notes,
    }
    with _atomic.outputs() as tx:
        tmp = tx.folder(out, replace=True)  # checked above: empty or a previous export
        try:
            (tmp / "model.py").write_text(src, encoding="utf-8")
            (tmp / "net.prototxt").write_text(net_to_text(net), encoding="utf-8")
            save_model(gm, str(tmp / "weights.safetensors"))
            (tmp / "caffe_names.json").write_text(
                json.dumps(meta, indent=1, ensure_ascii=False), encoding="utf-8")
            if pre is not None:
                (tmp / "preprocess.json").write_text(
                    json.dumps(pre, indent=1, ensure_ascii=False), encoding="utf-8")
        except OSError as exc:
            raise SurgeryError(f"{out_dir}: cannot write: {exc.strerror or exc}") from None
    return Path(out_dir)
