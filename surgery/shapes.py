"""Caffe's shape inference: what each layer's ``LayerSetUp``/``Reshape`` computes, per type.

One plain function per layer type, registered by decorator in three tables (registering a type
twice is an error):

* :func:`top_shapes` -- the shapes ``Reshape()`` gives the tops;
* :func:`param_shapes` -- the learnable blobs ``LayerSetUp()`` creates, in blob order;
* :func:`macs` -- a multiply-add estimate.

:func:`infer` walks a resolved :class:`~surgery.dataflow.Dataflow` in order and returns a
:class:`ShapeInfo`. Shapes are tuples of ints; ``()`` is a scalar (a loss), ``None`` means
unknown (a ``Data`` layer with no shape given, a ``Python`` layer, an unregistered fork type, or
anything downstream of those). An unknown shape never raises: it propagates as ``None``.

Semantics follow BVLC Caffe master and the SSD fork (``PriorBox``, ``DetectionOutput``,
``Normalize``, ``Permute``), plus the common forks' ``Interp`` (PSPNet), ``Upsample`` (SegNet's
two-bottom form and the one-bottom YOLO form), ``ShuffleChannel``, ``ROIPooling``,
``PSROIPooling`` (R-FCN) and ``Axpy`` (SENet). What Caffe refuses raises
:class:`~surgery.errors.ShapeMismatchError` naming the layer, the bottoms' shapes and a fix.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .dataflow import Dataflow, Node, Value
from .errors import ShapeMismatchError, UnsupportedLayerError
from .layers import LOSS_TYPES as _LAYER_LOSS_TYPES
from .layers import attr, bn_layout
from .layers import floats as _floats
from .layers import ints as _ints
from .net import Layer

__all__ = [
    "Shape",
    "ShapeInfo",
    "top_shapes",
    "param_shapes",
    "macs",
    "infer",
    "supported_types",
    "shape_rule",
    "param_rule",
    "macs_rule",
    "blob_shape_matches",
    "count",
    "guess_dataset_shapes",
    "starting_shapes",
]

Shape = tuple[int, ...]
TopFn = Callable[[Layer, list[Shape]], list[Shape | None]]
ParamFn = Callable[[Layer, list[Shape]], list[Shape]]
MacsFn = Callable[[Layer, list[Shape], list[Shape]], int]

_TOPS: dict[str, TopFn] = {}
_PARAMS: dict[str, ParamFn] = {}
_MACS: dict[str, MacsFn] = {}
_NUM_BOTTOMS: dict[str, tuple[int, int | None]] = {}

# Layers that read a dataset: their shapes come from ``input_shapes`` or stay unknown.
_SOURCE_TYPES = (
    "Data",
    "ImageData",
    "HDF5Data",
    "AnnotatedData",
    "WindowData",
    "VideoData",
    "Python",
    "ImageLabelmapData",  # HED's fork: image + label map, read with image_data_param
)


def _register(table: dict[str, Any], types: Sequence[str]) -> Callable[[Any], Any]:
    def deco(fn: Any) -> Any:
        for t in types:
            if t in table:
                raise ValueError(f"layer type {t!r} is already registered ({table[t].__name__})")
            table[t] = fn
        return fn

    return deco


def shape_rule(*types: str, bottoms: tuple[int, int | None] = (1, 1)) -> Callable[[TopFn], TopFn]:
    """Register a top-shape function for ``types``.

    Args:
        types: the layer types.
        bottoms: the (min, max) number of bottoms Caffe accepts (max None: no limit).

    Raises:
        ValueError: one of the types already has a rule.
    """
    for t in types:
        if t not in _TOPS:
            _NUM_BOTTOMS[t] = bottoms
    return _register(_TOPS, types)


def param_rule(*types: str) -> Callable[[ParamFn], ParamFn]:
    """Register a learnable-blob-shape function for ``types``.

    Raises:
        ValueError: one of the types already has a rule.
    """
    return _register(_PARAMS, types)


def macs_rule(*types: str) -> Callable[[MacsFn], MacsFn]:
    """Register a multiply-add estimate for ``types``.

    Raises:
        ValueError: one of the types already has a rule.
    """
    return _register(_MACS, types)


def supported_types() -> frozenset[str]:
    """The layer types :func:`top_shapes` knows."""
    return frozenset(_TOPS)


# -- public per-layer API ---------------------------------------------------------------------
def top_shapes(layer: Layer, bottom_shapes: Sequence[Shape]) -> list[Shape | None]:
    """The top shapes Caffe's ``Reshape()`` gives ``layer`` for these bottom shapes.

    Data-source layers (``Data``, ``Python``, ...) return ``None`` for each top: their shape
    comes from the dataset (give it to :func:`infer` through ``input_shapes``).

    Args:
        layer: the layer.
        bottom_shapes: one shape per bottom, in order.

    Returns:
        One shape (or None when it cannot be known) per top.

    Raises:
        UnsupportedLayerError: no rule for ``layer.type``.
        ShapeMismatchError: Caffe would refuse this configuration or these bottoms.
    """
    fn = _TOPS.get(layer.type)
    if fn is None:
        raise UnsupportedLayerError(
            f"layer {layer.name!r}: no shape rule for type {layer.type!r}; give its tops' shapes "
            "through input_shapes, or register one with surgery.shapes.shape_rule"
        )
    bottoms = [tuple(int(d) for d in s) for s in bottom_shapes]
    lo, hi = _NUM_BOTTOMS.get(layer.type, (0, None))
    if len(bottoms) < lo or (hi is not None and len(bottoms) > hi):
        want = str(lo) if lo == hi else f"{lo} or more" if hi is None else f"{lo} to {hi}"
        _fail(
            layer,
            bottoms,
            f"Caffe's {layer.type} takes {want} bottom(s), this layer has {len(bottoms)}",
            "Fix the layer's bottoms.",
        )
    tops = fn(layer, bottoms)
    if len(tops) != len(layer.tops):
        _fail(
            layer,
            bottoms,
            f"Caffe's {layer.type} gives {len(tops)} top(s) here but the layer lists "
            f"{len(layer.tops)}",
            "List as many tops as the layer type produces.",
        )
    return tops


def param_shapes(layer: Layer, bottom_shapes: Sequence[Shape]) -> list[Shape]:
    """The learnable blob shapes Caffe's ``LayerSetUp()`` creates, in blob order.

    Returns ``[]`` for types without learnable blobs (and unknown types).

    Raises:
        ShapeMismatchError: Caffe would refuse this configuration.
    """
    fn = _PARAMS.get(layer.type)
    if fn is None:
        return []
    return fn(layer, [tuple(int(d) for d in s) for s in bottom_shapes])


def macs(layer: Layer, bottom_shapes: Sequence[Shape], top_shapes: Sequence[Shape]) -> int:
    """Multiply-adds of one forward pass of ``layer`` (bias additions not counted).

    Counted: Convolution and its depthwise forks, Deconvolution, InnerProduct (one
    multiply-add per weight use), and Scale (one per top element). Every other type is 0:
    elementwise activations, pooling, normalisation and data movement are cheap next to the
    weighted layers and are not multiply-adds in the usual sense.
    """
    fn = _MACS.get(layer.type)
    if fn is None:
        return 0
    return int(fn(layer, list(bottom_shapes), list(top_shapes)))


def count(shape: Shape) -> int:
    """Number of elements of a blob of ``shape`` (1 for a scalar)."""
    return math.prod(shape)


def blob_shape_matches(expected: Sequence[int], found: Sequence[int]) -> bool:
    """Caffe's blob shape comparison when copying weights.

    Equal shapes match; legacy (V1) 4-D shapes match on trailing axes, the missing leading
    axes being 1 (a V1 InnerProduct weight ``(1, 1, N, K)`` equals ``(N, K)``).
    """
    a, b = tuple(int(x) for x in expected), tuple(int(x) for x in found)
    if a == b:
        return True
    n = max(len(a), len(b))
    if n > 4:
        return False
    return (1,) * (n - len(a)) + a == (1,) * (n - len(b)) + b


# -- whole-net inference ----------------------------------------------------------------------
@dataclass
class ShapeInfo:
    """Shapes of every value of a :class:`~surgery.dataflow.Dataflow`.

    Attributes:
        flow: the dataflow the shapes belong to.
        value_shapes: shape per :class:`~surgery.dataflow.Value` (by identity); None = unknown.
        node_params: learnable blob shapes per node (``[]`` when unknown or none).
        node_macs: multiply-adds per node (0 when unknown).
        unknown_types: nodes whose type has no shape rule (their tops are None).
    """

    flow: Dataflow
    value_shapes: dict[Value, Shape | None] = field(default_factory=dict)
    node_params: dict[Node, list[Shape]] = field(default_factory=dict)
    node_macs: dict[Node, int] = field(default_factory=dict)
    unknown_types: list[Node] = field(default_factory=list)

    def shape(self, value: Value) -> Shape | None:
        """The shape of one value (one version of a blob), None when unknown."""
        return self.value_shapes[value]

    def tops(self, node: Node) -> list[Shape | None]:
        """The shapes of ``node``'s tops."""
        return [self.value_shapes[v] for v in node.outputs]

    def bottoms(self, node: Node) -> list[Shape | None]:
        """The shapes of ``node``'s bottoms."""
        return [self.value_shapes[v] for v in node.inputs]

    def params(self, node: Node) -> list[Shape]:
        """``node``'s learnable blob shapes (``[]`` when none or when its bottoms are unknown)."""
        return list(self.node_params.get(node, []))

    def macs(self, node: Node) -> int:
        """``node``'s multiply-adds (0 when its shapes are unknown)."""
        return self.node_macs.get(node, 0)

    @property
    def total_macs(self) -> int:
        return sum(self.node_macs.values())

    def blob_shapes(self) -> dict[str, Shape | None]:
        """Shape per blob name, for the *last* version of each name (what Caffe's blob holds)."""
        return {name: self.value_shapes[self.flow.latest(name)] for name in self.flow.blob_names()}


def infer(
    flow: Dataflow,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    *,
    check_weights: bool = True,
) -> ShapeInfo:
    """Infer every value's shape, walking ``flow``'s nodes in order.

    Args:
        flow: a resolved dataflow (:func:`surgery.dataflow.resolve`).
        input_shapes: shapes by top name for source layers (no bottoms: ``Input``, ``Data``,
            ``DummyData``...) and ``Python`` layers; they override what the layer says.
        check_weights: compare loaded weight arrays with the learnable blob shapes, as Caffe
            does when it copies weights.

    Returns:
        The shapes; unknown ones are None.

    Raises:
        ShapeMismatchError: a layer Caffe would refuse, or loaded weights of the wrong shape.
    """
    given = {k: tuple(int(d) for d in v) for k, v in (input_shapes or {}).items()}
    info = ShapeInfo(flow)
    for node in flow.nodes:
        layer = node.layer
        bottoms = [info.value_shapes[v] for v in node.inputs]
        overridable = not node.inputs or layer.type in _SOURCE_TYPES
        overrides = [given.get(t) if overridable else None for t in layer.tops]
        tops: list[Shape | None]
        if overrides and all(s is not None for s in overrides):
            tops = list(overrides)
        elif layer.type not in _TOPS:
            info.unknown_types.append(node)
            tops = list(overrides) if overrides else [None] * len(layer.tops)
        elif any(b is None for b in bottoms):
            tops = [None] * len(layer.tops)
        else:
            known = [b for b in bottoms if b is not None]
            tops = top_shapes(layer, known)
            tops = [o if o is not None else t for o, t in zip(overrides, tops, strict=True)]
        for v, s in zip(node.outputs, tops, strict=True):
            if s is not None:
                _check_blob(layer, bottoms, v.name, s, source=not node.inputs)
            info.value_shapes[v] = s
        if all(b is not None for b in bottoms):
            known = [b for b in bottoms if b is not None]
            params = param_shapes(layer, known)
            for i, ps in enumerate(params):
                if math.prod(ps) > MAX_COUNT:
                    _fail(layer, known, f"learnable blob {i} would have shape {tuple(ps)}, "
                          f"{math.prod(ps):,} elements, more than Caffe's limit of "
                          f"{MAX_COUNT:,} (INT_MAX)", "Fix num_output or the input size.")
            info.node_params[node] = params
            if check_weights:
                _check_weights(layer, known, params)
            if all(t is not None for t in tops):
                info.node_macs[node] = macs(layer, known, [t for t in tops if t is not None])
    return info


#: Caffe's limits on a blob (``blob.cpp``): at most 32 axes, at most INT_MAX elements.
MAX_AXES = 32
MAX_COUNT = 2**31 - 1


def _check_blob(layer: Layer, bottoms: Sequence[Shape | None], blob: str, shape: Shape,
                *, source: bool) -> None:
    """Caffe's ``Blob::Reshape`` checks, and positive sizes for a net input."""
    if len(shape) > MAX_AXES:
        _fail(layer, bottoms, f"top {blob!r} would have {len(shape)} axes, more than Caffe's "
              f"limit of {MAX_AXES}", "Give the blob at most 32 axes.")
    if any(d < 0 or (source and d == 0) for d in shape):
        _fail(layer, bottoms, f"top {blob!r} would have shape {_short(shape)}: every size must be "
              f"{'positive' if source else 'non-negative'}",
              "Fix the input shape (dim)." if source else "Fix the layer's parameters.")
    n = 1
    for d in shape:
        n *= d
    if n > MAX_COUNT:
        _fail(layer, bottoms, f"top {blob!r} would have shape {shape}, {n:,} elements, more "
              f"than Caffe's limit of {MAX_COUNT:,} (INT_MAX)",
              "Fix the input shape or the layer's sizes.")


def _check_weights(layer: Layer, bottoms: list[Shape], expected: list[Shape]) -> None:
    if layer.type not in _PARAMS:
        return
    loaded = [p.data for p in layer.params]
    if not any(d is not None for d in loaded):
        return
    if len(loaded) != len(expected) or any(d is None for d in loaded):
        present = [d for d in loaded if d is not None]
        missing = [i for i, d in enumerate(loaded) if d is None]
        got = ", ".join(str(tuple(d.shape)) for d in present) or "none"
        _fail(
            layer,
            bottoms,
            f"the loaded weights have {len(present)} blob(s) ({got})"
            + (f", blob(s) {missing} missing" if missing and len(loaded) == len(expected)
               else "")
            + f"; Caffe expects {len(expected)} "
            f"({', '.join(str(s) for s in expected) or 'none'})",
            "Rename the layer to learn it from scratch, or fix bias_term / the layer parameters.",
        )
    for i, (data, want) in enumerate(zip(loaded, expected, strict=True)):
        assert data is not None
        if not blob_shape_matches(want, data.shape):
            _fail(
                layer,
                bottoms,
                f"learnable blob {i} has shape {tuple(data.shape)} in the weights but the layer "
                f"needs {want}",
                "Rename the layer to learn it from scratch, or fix num_output / the input size.",
            )


# -- helpers ----------------------------------------------------------------------------------
def _short(shape: Shape | None) -> str:
    if shape is not None and len(shape) > 8:
        return f"({len(shape)} axes: {', '.join(map(str, shape[:4]))}, ...)"
    return str(shape)


def _fail(layer: Layer, bottoms: Sequence[Shape | None], what: str, fix: str = "") -> None:
    shapes = ", ".join(_short(b) for b in bottoms) if bottoms else "none"
    msg = f"layer {layer.name!r} ({layer.type}): {what}; bottom shapes: {shapes}."
    raise ShapeMismatchError(msg + (" " + fix if fix else ""))


def _get(layer: Layer, key: str, fallback: Any = None) -> Any:
    # Fork fields may be missing from our caffe.proto: fall back to the fork's own default.
    return attr(layer, key, fallback)


def _has(layer: Layer, key: str) -> bool:
    return key in layer.attrs


def _dims(blob_shape: Any) -> Shape:
    if isinstance(blob_shape, Mapping):
        return tuple(int(d) for d in blob_shape.get("dim", []))
    return tuple(int(d) for d in blob_shape)


def _axis(layer: Layer, axis: int, shape: Shape, what: str = "axis") -> int:
    """Caffe's ``Blob::CanonicalAxisIndex``."""
    n = len(shape)
    if not -n <= axis < n:
        _fail(
            layer,
            [shape],
            f"{what} {axis} is out of range for a {n}-axis bottom",
            f"Use an {what} in [{-n}, {n - 1}].",
        )
    return axis + n if axis < 0 else axis


def _legacy(shape: Shape, index: int) -> int:
    """Caffe's ``Blob::LegacyShape`` for num/channels/height/width (0..3)."""
    return shape[index] if index < len(shape) else 1


def _same(layer: Layer, bottoms: list[Shape]) -> list[Shape | None]:
    return [bottoms[0]]


# -- data layers ------------------------------------------------------------------------------
@shape_rule("Input", bottoms=(0, 0))
def _input(layer: Layer, bottoms: list[Shape]) -> list[Shape | None]:
    shapes = [_dims(s) for s in _get(layer, "shape", [])]
    n = len(layer.tops)
    if not shapes:
        return [None] * n  # no shape written: give it through input_shapes
    if len(shapes) not in (1, n):
        _fail(
            layer,
            bottoms,
            f"input_param has {len(shapes)} shapes for {n} tops",
            "Give one shape, or one per top.",
        )
    return [shapes[0] if len(shapes) == 1 else shapes[i] for i in range(n)]


@shape_rule("DummyData", bottoms=(0, 0))
def _dummy_data(layer: Layer, bottoms: list[Shape]) -> list[Shape | None]:
    n = len(layer.tops)
    legacy = [_ints(_get(layer, k, [])) for k in ("num", "channels", "height", "width")]
    if any(legacy):
        out: list[Shape | None] = []
        for i in range(n):
            dims = []
            for vals in legacy:
                if len(vals) not in (1, n):
                    _fail(layer, bottoms, "num/channels/height/width need 1 value or 1 per top")
                dims.append(vals[0] if len(vals) == 1 else vals[i])
            out.append(tuple(dims))
        return out
    shapes = [_dims(s) for s in _get(layer, "shape", [])]
    if len(shapes) not in (1, n):
        _fail(
            layer,
            bottoms,
            f"dummy_data_param has {len(shapes)} shapes for {n} tops",
            "Give one shape, or one per top.",
        )
    return [shapes[0] if len(shapes) == 1 else shapes[i] for i in range(n)]


@shape_rule("MemoryData", bottoms=(0, 0))
def _memory_data(layer: Layer, bottoms: list[Shape]) -> list[Shape | None]:
    b = int(_get(layer, "batch_size", 0))
    data = (
        b,
        int(_get(layer, "channels", 0)),
        int(_get(layer, "height", 0)),
        int(_get(layer, "width", 0)),
    )
    return [data, (b,)][: len(layer.tops)]


@shape_rule(*_SOURCE_TYPES, bottoms=(0, None))
def _from_dataset(layer: Layer, bottoms: list[Shape]) -> list[Shape | None]:
    return [None] * len(layer.tops)  # known only from the data itself


@shape_rule("Silence", "HDF5Output", bottoms=(1, None))
def _no_tops(layer: Layer, bottoms: list[Shape]) -> list[Shape | None]:
    return []


# -- convolution ------------------------------------------------------------------------------
CONV_TYPES = ("Convolution", "ConvolutionDepthwise", "DepthwiseConvolution")


@dataclass
class _ConvGeometry:
    channel_axis: int
    kernel: list[int]
    pad: list[int]
    stride: list[int]
    dilation: list[int]
    num_output: int
    group: int

    @property
    def extent(self) -> list[int]:
        return [d * (k - 1) + 1 for k, d in zip(self.kernel, self.dilation, strict=True)]


def _per_axis(layer: Layer, bottom: Shape, key: str, hw: str, default: int, n: int) -> list[int]:
    """A repeated conv field (``kernel_size``, ``pad``, ``stride``) or its ``_h``/``_w`` form."""
    h, w = f"{hw}_h", f"{hw}_w"
    if _has(layer, h) or _has(layer, w):
        if n != 2:
            _fail(
                layer,
                [bottom],
                f"{h}/{w} can only be used with 2 spatial axes, this bottom has {n}",
                f"Write {key} once per spatial axis instead.",
            )
        if _ints(layer.attrs.get(key)):
            _fail(layer, [bottom], f"both {key} and {h}/{w} are set", "Use one form only.")
        return [int(_get(layer, h, default)), int(_get(layer, w, default))]
    vals = _ints(_get(layer, key, []))
    if not vals:
        return [default] * n
    if len(vals) not in (1, n):
        _fail(
            layer,
            [bottom],
            f"{key} has {len(vals)} values for {n} spatial axes",
            f"Give one {key} for all axes or one per spatial axis.",
        )
    return vals * n if len(vals) == 1 else vals


def _conv_geometry(layer: Layer, bottoms: list[Shape]) -> _ConvGeometry:
    b = bottoms[0]
    for other in bottoms[1:]:
        if other != b:
            _fail(
                layer,
                bottoms,
                "all bottoms of a convolution must have the same shape",
                "Use one layer per input shape.",
            )
    channel_axis = _axis(layer, int(_get(layer, "axis", 1)), b)
    n = len(b) - channel_axis - 1
    if n < 1:
        _fail(
            layer,
            bottoms,
            "no spatial axes after the channel axis",
            "Give the bottom at least one spatial axis, or lower axis.",
        )
    if _has(layer, "kernel_h") or _has(layer, "kernel_w"):
        if not (_has(layer, "kernel_h") and _has(layer, "kernel_w")):
            _fail(layer, bottoms, "kernel_h and kernel_w must be set together", "Set both.")
    elif not _ints(layer.attrs.get("kernel_size")):
        _fail(layer, bottoms, "no kernel_size", "Set kernel_size (or kernel_h and kernel_w).")
    kernel = _per_axis(layer, b, "kernel_size", "kernel", 0, n)
    if any(k <= 0 for k in kernel):
        _fail(layer, bottoms, f"kernel {kernel} has a non-positive size", "Fix kernel_size.")
    pad = _per_axis(layer, b, "pad", "pad", 0, n)
    stride = _per_axis(layer, b, "stride", "stride", 1, n)
    if any(s <= 0 for s in stride):
        _fail(layer, bottoms, f"stride {stride} must be positive", "Fix stride.")
    dilation = _ints(_get(layer, "dilation", []))
    if len(dilation) not in (0, 1, n):
        _fail(
            layer,
            bottoms,
            f"dilation has {len(dilation)} values for {n} spatial axes",
            "Give one dilation for all axes or one per spatial axis.",
        )
    dilation = [1] * n if not dilation else dilation * n if len(dilation) == 1 else dilation
    if any(d <= 0 for d in dilation):
        _fail(layer, bottoms, f"convolution_param.dilation {dilation} must be positive",
              "Fix dilation (1 means no dilation).")
    for what, vals in (("kernel_size", kernel), ("pad", pad), ("stride", stride),
                       ("dilation", dilation)):
        if any(v > MAX_COUNT for v in vals):
            _fail(layer, bottoms, f"convolution_param.{what} {vals} is beyond Caffe's int range",
                  f"Fix {what}.")
    num_output = int(_get(layer, "num_output", 0))
    group = int(_get(layer, "group", 1))
    if num_output <= 0:
        _fail(layer, bottoms, "num_output must be positive", "Set num_output.")
    channels = b[channel_axis]
    if group <= 0 or channels % group or num_output % group:
        _fail(
            layer,
            bottoms,
            f"group {group} must divide both the input channels ({channels}) and "
            f"num_output ({num_output})",
            "Choose a group that divides both.",
        )
    return _ConvGeometry(channel_axis, kernel, pad, stride, dilation, num_output, group)


@shape_rule(*CONV_TYPES, bottoms=(1, None))
def _conv(layer: Layer, bottoms: list[Shape]) -> list[Shape | None]:
    g = _conv_geometry(layer, bottoms)
    b = bottoms[0]
    spatial = b[g.channel_axis + 1 :]
    out = []
    for i, size in enumerate(spatial):
        padded = size + 2 * g.pad[i]
        if padded < g.extent[i]:
            _fail(
                layer,
                bottoms,
                f"kernel extent {g.extent[i]} (kernel {g.kernel[i]}, dilation {g.dilation[i]}) "
                f"is larger than the padded input {padded} on spatial axis {i}",
                "Use a larger input, more padding or a smaller kernel.",
            )
        out.append((padded - g.extent[i]) // g.stride[i] + 1)  # Caffe rounds down
    top = b[: g.channel_axis] + (g.num_output,) + tuple(out)
    return [top] * len(bottoms)  # one top per bottom, all of the same shape


@shape_rule("Deconvolution", bottoms=(1, None))
def _deconv(layer: Layer, bottoms: list[Shape]) -> list[Shape | None]:
    g = _conv_geometry(layer, bottoms)
    b = bottoms[0]
    out = []
    for i, size in enumerate(b[g.channel_axis + 1 :]):
        o = g.stride[i] * (size - 1) + g.extent[i] - 2 * g.pad[i]
        if o <= 0:
            _fail(
                layer,
                bottoms,
                f"output size {o} on spatial axis {i} is not positive",
                "Reduce pad.",
            )
        out.append(o)
    top = b[: g.channel_axis] + (g.num_output,) + tuple(out)
    return [top] * len(bottoms)  # one top per bottom, all of the same shape


def _bias(layer: Layer, n: int) -> list[Shape]:
    return [(n,)] if bool(_get(layer, "bias_term", True)) else []


@param_rule(*CONV_TYPES)
def _conv_params(layer: Layer, bottoms: list[Shape]) -> list[Shape]:
    g = _conv_geometry(layer, bottoms)
    c = bottoms[0][g.channel_axis]
    return [(g.num_output, c // g.group, *g.kernel)] + _bias(layer, g.num_output)


@param_rule("Deconvolution")
def _deconv_params(layer: Layer, bottoms: list[Shape]) -> list[Shape]:
    g = _conv_geometry(layer, bottoms)
    c = bottoms[0][g.channel_axis]
    return [(c, g.num_output // g.group, *g.kernel)] + _bias(layer, g.num_output)


@macs_rule(*CONV_TYPES)
def _conv_macs(layer: Layer, bottoms: list[Shape], tops: list[Shape]) -> int:
    g = _conv_geometry(layer, bottoms)
    c = bottoms[0][g.channel_axis]
    per_output = (c // g.group) * math.prod(g.kernel)
    return sum(count(t) for t in tops) * per_output


@macs_rule("Deconvolution")
def _deconv_macs(layer: Layer, bottoms: list[Shape], tops: list[Shape]) -> int:
    g = _conv_geometry(layer, bottoms)
    per_input = (g.num_output // g.group) * math.prod(g.kernel)
    return sum(count(b) for b in bottoms) * per_input


# -- pooling ----------------------------------------------------------------------------------
def _pool_hw(layer: Layer, bottoms: list[Shape], key: str, default: int) -> tuple[int, int]:
    h, w = f"{key}_h", f"{key}_w"
    base = "kernel_size" if key == "kernel" else key
    if _has(layer, h) or _has(layer, w):
        if not (_has(layer, h) and _has(layer, w)):
            _fail(layer, bottoms, f"{h} and {w} must be set together", "Set both.")
        if _has(layer, base):
            _fail(layer, bottoms, f"both {base} and {h}/{w} are set", "Use one form only.")
        return int(layer.attrs[h]), int(layer.attrs[w])
    vals = _ints(_get(layer, base, default))
    v = vals[0] if vals else default
    return v, v


@shape_rule("Pooling")
def _pooling(layer: Layer, bottoms: list[Shape]) -> list[Shape | None]:
    b = bottoms[0]
    if len(b) != 4:
        _fail(
            layer,
            bottoms,
            f"Pooling needs a 4-axis bottom, got {len(b)} axes",
            "Reshape the bottom to (N, C, H, W).",
        )
    n, c, height, width = b
    pad_h, pad_w = _pool_hw(layer, bottoms, "pad", 0)
    stride_h, stride_w = _pool_hw(layer, bottoms, "stride", 1)
    if bool(_get(layer, "global_pooling", False)):
        if pad_h or pad_w or stride_h != 1 or stride_w != 1:
            _fail(
                layer, bottoms, "global_pooling needs pad 0 and stride 1", "Remove pad and stride."
            )
        kernel_h, kernel_w = height, width
    else:
        if not (_has(layer, "kernel_size") or _has(layer, "kernel_h") or _has(layer, "kernel_w")):
            _fail(layer, bottoms, "no kernel_size", "Set kernel_size or global_pooling: true.")
        kernel_h, kernel_w = _pool_hw(layer, bottoms, "kernel", 0)
    if kernel_h <= 0 or kernel_w <= 0 or stride_h <= 0 or stride_w <= 0:
        _fail(layer, bottoms, "kernel and stride must be positive", "Fix kernel_size/stride.")
    if (pad_h or pad_w) and (pad_h >= kernel_h or pad_w >= kernel_w):
        _fail(
            layer,
            bottoms,
            f"pad ({pad_h}, {pad_w}) must be smaller than the kernel ({kernel_h}, {kernel_w})",
            "Reduce pad.",
        )
    if "ceil_mode" in layer.attrs:  # fork field (brocolli/OpenCV): bool
        ceil = bool(layer.attrs["ceil_mode"])
    else:
        ceil = str(_get(layer, "round_mode", "CEIL")) == "CEIL"

    def out(size: int, k: int, p: int, s: int) -> int:
        span = size + 2 * p - k
        o = (-(-span // s) if ceil else span // s) + 1
        # Caffe: with any padding the last window must start inside the image (plus pad);
        # both axes are clipped when either pad is non-zero.
        if (pad_h or pad_w) and (o - 1) * s >= size + p:
            o -= 1
        return o

    ph = out(height, kernel_h, pad_h, stride_h)
    pw = out(width, kernel_w, pad_w, stride_w)
    if ph <= 0 or pw <= 0:
        _fail(
            layer,
            bottoms,
            f"the kernel ({kernel_h}, {kernel_w}) is larger than the padded "
            f"input; output would be ({ph}, {pw})",
            "Use a smaller kernel or more padding.",
        )
    return [(n, c, ph, pw)] * len(layer.tops)  # a second top is the MAX mask, same shape


# -- fully connected --------------------------------------------------------------------------
def _ip_dims(layer: Layer, bottoms: list[Shape]) -> tuple[int, int, int]:
    b = bottoms[0]
    axis = _axis(layer, int(_get(layer, "axis", 1)), b)
    num_output = int(_get(layer, "num_output", 0))
    if num_output <= 0:
        _fail(layer, bottoms, "num_output must be positive", "Set num_output.")
    return axis, math.prod(b[axis:]), num_output


@shape_rule("InnerProduct")
def _inner_product(layer: Layer, bottoms: list[Shape]) -> list[Shape | None]:
    axis, _, n = _ip_dims(layer, bottoms)
    return [bottoms[0][:axis] + (n,)]


@param_rule("InnerProduct")
def _inner_product_params(layer: Layer, bottoms: list[Shape]) -> list[Shape]:
    _, k, n = _ip_dims(layer, bottoms)
    weight = (k, n) if bool(_get(layer, "transpose", False)) else (n, k)
    return [weight] + _bias(layer, n)


@macs_rule("InnerProduct")
def _inner_product_macs(layer: Layer, bottoms: list[Shape], tops: list[Shape]) -> int:
    axis, k, n = _ip_dims(layer, bottoms)
    return math.prod(bottoms[0][:axis]) * k * n


@shape_rule("Embed")
def _embed(layer: Layer, bottoms: list[Shape]) -> list[Shape | None]:
    return [bottoms[0] + (int(_get(layer, "num_output", 0)),)]


@param_rule("Embed")
def _embed_params(layer: Layer, bottoms: list[Shape]) -> list[Shape]:
    n = int(_get(layer, "num_output", 0))
    return [(int(_get(layer, "input_dim", 0)), n)] + _bias(layer, n)


# -- elementwise and same-shape layers --------------------------------------------------------
shape_rule(
    "ReLU",
    "ELU",
    "Sigmoid",
    "TanH",
    "AbsVal",
    "Power",
    "Exp",
    "Log",
    "BNLL",
    "Threshold",
    "Clip",
    "Swish",
    "MVN",
    "BN",  # PSPNet/SegNet fork BN
)(_same)


@shape_rule("Softmax")
def _softmax(layer: Layer, bottoms: list[Shape]) -> list[Shape | None]:
    _axis(layer, int(_get(layer, "axis", 1)), bottoms[0], "softmax_param.axis")
    return [bottoms[0]]


@shape_rule("Dropout")
def _dropout(layer: Layer, bottoms: list[Shape]) -> list[Shape | None]:
    ratio = float(_get(layer, "dropout_ratio", 0.5))
    if not 0.0 <= ratio < 1.0:
        _fail(layer, bottoms, f"dropout_param.dropout_ratio {ratio} is outside [0, 1)",
              "Caffe requires 0 <= dropout_ratio < 1.")
    return [bottoms[0]]


@param_rule("BN")
def _bn_params(layer: Layer, bottoms: list[Shape]) -> list[Shape]:
    # PSPNet: slope, bias, moving mean, moving variance; SegNet: scale, shift (see bn_layout)
    b = bottoms[0]
    c = b[1] if len(b) > 1 else 1
    return [(1, c, 1, 1)] * (4 if bn_layout(layer) == "pspnet" else 2)


@shape_rule("Split")
def _split(layer: Layer, bottoms: list[Shape]) -> list[Shape | None]:
    return [bottoms[0]] * len(layer.tops)


@shape_rule("PReLU")
def _prelu(layer: Layer, bottoms: list[Shape]) -> list[Shape | None]:
    if len(bottoms[0]) < 2:
        _fail(
            layer,
            bottoms,
            "PReLU needs a bottom with at least 2 axes",
            "Reshape the bottom to (N, C, ...).",
        )
    return [bottoms[0]]


@param_rule("PReLU")
def _prelu_params(layer: Layer, bottoms: list[Shape]) -> list[Shape]:
    b = bottoms[0]
    if bool(_get(layer, "channel_shared", False)):
        return [(1,)]
    return [(b[1] if len(b) >= 2 else 1,)]


@shape_rule("BatchNorm")
def _batch_norm(layer: Layer, bottoms: list[Shape]) -> list[Shape | None]:
    return [bottoms[0]]


@param_rule("BatchNorm")
def _batch_norm_params(layer: Layer, bottoms: list[Shape]) -> list[Shape]:
    b = bottoms[0]
    c = b[1] if len(b) > 1 else 1
    return [(c,), (c,), (1,)]  # mean_sum, var_sum, factor


@shape_rule("LRN")
def _lrn(layer: Layer, bottoms: list[Shape]) -> list[Shape | None]:
    if len(bottoms[0]) != 4:
        _fail(
            layer,
            bottoms,
            f"LRN needs a 4-axis bottom, got {len(bottoms[0])} axes",
            "Reshape the bottom to (N, C, H, W).",
        )
    if int(_get(layer, "local_size", 5)) % 2 == 0:
        _fail(layer, bottoms, "local_size must be odd", "Use an odd local_size.")
    return [bottoms[0]]


def _scale_blob_shape(layer: Layer, bottoms: list[Shape]) -> Shape:
    """The shape of Scale's/Bias's factor: from ``axis`` over ``num_axes`` (or bottom[1])."""
    b = bottoms[0]
    if len(bottoms) > 1:
        other = bottoms[1]
        # Caffe: a scalar second bottom broadcasts over everything (axis forced to 0).
        axis = 0 if len(other) == 0 else _axis(layer, int(_get(layer, "axis", 1)), b)
        if b[axis : axis + len(other)] != other:
            _fail(
                layer,
                bottoms,
                f"bottom[1] {other} must equal bottom[0]'s axes {axis}..{axis + len(other) - 1} "
                f"({b[axis : axis + len(other)]})",
                "Change axis, or reshape bottom[1].",
            )
        return other
    num_axes = int(_get(layer, "num_axes", 1))
    if num_axes < -1:
        _fail(layer, bottoms, f"num_axes {num_axes} must be -1 or non-negative", "Fix num_axes.")
    axis = int(_get(layer, "axis", 1))
    if num_axes == 0 and len(b) == 0:
        return ()
    axis = _axis(layer, axis, b) if len(b) else 0
    end = len(b) if num_axes == -1 else axis + num_axes
    if end > len(b):
        _fail(
            layer,
            bottoms,
            f"axis {axis} + num_axes {num_axes} exceeds the bottom's {len(b)} axes",
            "Lower axis or num_axes.",
        )
    return b[axis:end]


@shape_rule("Scale", "Bias", bottoms=(1, 2))
def _scale(layer: Layer, bottoms: list[Shape]) -> list[Shape | None]:
    _scale_blob_shape(layer, bottoms)  # validates the second bottom / axes
    return [bottoms[0]]


@param_rule("Scale")
def _scale_params(layer: Layer, bottoms: list[Shape]) -> list[Shape]:
    shape = _scale_blob_shape(layer, bottoms)
    params = [shape] if len(bottoms) == 1 else []
    if bool(_get(layer, "bias_term", False)):
        params.append(shape)
    return params


@param_rule("Bias")
def _bias_params(layer: Layer, bottoms: list[Shape]) -> list[Shape]:
    return [_scale_blob_shape(layer, bottoms)] if len(bottoms) == 1 else []


@macs_rule("Scale")
def _scale_macs(layer: Layer, bottoms: list[Shape], tops: list[Shape]) -> int:
    return count(tops[0])


@shape_rule("Eltwise", bottoms=(2, None))
def _eltwise(layer: Layer, bottoms: list[Shape]) -> list[Shape | None]:
    for i, other in enumerate(bottoms[1:], 1):
        if other != bottoms[0]:
            _fail(
                layer,
                bottoms,
                f"bottom[{i}] {other} differs from bottom[0] {bottoms[0]}; Eltwise needs "
                "identical shapes (no broadcasting)",
                "Make them equal with Crop/Reshape/Tile, or use Scale/Bias to broadcast.",
            )
    op = str(_get(layer, "operation", "SUM"))
    coeff = _floats(_get(layer, "coeff", []))
    if coeff and op != "SUM":
        _fail(
            layer,
            bottoms,
            f"coeff is only allowed for SUM, operation is {op}",
            "Remove coeff or use operation: SUM.",
        )
    if coeff and len(coeff) != len(bottoms):
        _fail(
            layer,
            bottoms,
            f"{len(coeff)} coeff values for {len(bottoms)} bottoms",
            "Give one coeff per bottom.",
        )
    return [bottoms[0]]


# -- joining and splitting --------------------------------------------------------------------
def _join_axis(layer: Layer, bottoms: list[Shape], legacy_key: str) -> int:
    if _has(layer, legacy_key):
        axis = int(layer.attrs[legacy_key])
        if axis < 0:
            _fail(layer, bottoms, f"{legacy_key} must be non-negative", "Use axis instead.")
        return _axis(layer, axis, bottoms[0], legacy_key)
    return _axis(layer, int(_get(layer, "axis", 1)), bottoms[0])


@shape_rule("Concat", bottoms=(1, None))
def _concat(layer: Layer, bottoms: list[Shape]) -> list[Shape | None]:
    axis = _join_axis(layer, bottoms, "concat_dim")
    first = bottoms[0]
    total = 0
    for i, b in enumerate(bottoms):
        if len(b) != len(first) or b[:axis] + b[axis + 1 :] != first[:axis] + first[axis + 1 :]:
            _fail(
                layer,
                bottoms,
                f"bottom[{i}] {b} differs from bottom[0] {first} on an axis other than the "
                f"concat axis {axis}",
                "Concatenate along the axis where they differ, or crop/resize the inputs.",
            )
        total += b[axis]
    return [first[:axis] + (total,) + first[axis + 1 :]]


@shape_rule("Slice")
def _slice(layer: Layer, bottoms: list[Shape]) -> list[Shape | None]:
    b = bottoms[0]
    axis = _join_axis(layer, bottoms, "slice_dim")
    size = b[axis]
    n = len(layer.tops)
    points = _ints(_get(layer, "slice_point", []))
    if points:
        if len(points) != n - 1:
            _fail(
                layer,
                bottoms,
                f"{len(points)} slice_point values for {n} tops",
                "Give one slice_point fewer than tops.",
            )
        sizes, prev = [], 0
        for p in points:
            if p <= prev:
                _fail(
                    layer,
                    bottoms,
                    f"slice_point {points} must be strictly increasing and positive",
                    "Fix slice_point.",
                )
            sizes.append(p - prev)
            prev = p
        sizes.append(size - prev)
        if sizes[-1] < 0:
            _fail(
                layer,
                bottoms,
                f"slice_point {prev} is past the axis size {size}",
                "Fix slice_point.",
            )
    else:
        if n == 0 or size % n:
            _fail(
                layer,
                bottoms,
                f"axis {axis} of size {size} cannot be split equally into {n} tops",
                "Give slice_point, or change the number of tops.",
            )
        sizes = [size // n] * n
    return [b[:axis] + (s,) + b[axis + 1 :] for s in sizes]


@shape_rule("Flatten")
def _flatten(layer: Layer, bottoms: list[Shape]) -> list[Shape | None]:
    b = bottoms[0]
    start = _axis(layer, int(_get(layer, "axis", 1)), b)
    end = _axis(layer, int(_get(layer, "end_axis", -1)), b, "end_axis")
    if end < start:
        _fail(layer, bottoms, f"end_axis {end} comes before axis {start}", "Fix the axes.")
    return [b[:start] + (math.prod(b[start : end + 1]),) + b[end + 1 :]]


@shape_rule("Reshape")
def _reshape(layer: Layer, bottoms: list[Shape]) -> list[Shape | None]:
    b = bottoms[0]
    dims = _dims(_get(layer, "shape", {}))
    axis = int(_get(layer, "axis", 0))
    num_axes = int(_get(layer, "num_axes", -1))
    start = axis if axis >= 0 else len(b) + axis + 1
    if not 0 <= start <= len(b):
        _fail(layer, bottoms, f"axis {axis} is out of range", "Fix axis.")
    if num_axes < -1:
        _fail(layer, bottoms, f"num_axes {num_axes} must be >= -1", "Fix num_axes.")
    end = len(b) if num_axes == -1 else start + num_axes
    if end > len(b):
        _fail(
            layer,
            bottoms,
            f"axis {start} + num_axes {num_axes} exceeds the bottom's {len(b)} axes",
            "Fix axis/num_axes.",
        )
    new: list[int] = []
    inferred = -1
    for i, d in enumerate(dims):
        if d == 0:  # copy the bottom's axis at the same position
            if start + i >= len(b):
                _fail(
                    layer,
                    bottoms,
                    f"dim {i} is 0 but the bottom has no axis {start + i} to copy",
                    "Write the size explicitly.",
                )
            new.append(b[start + i])
        elif d == -1:
            if inferred >= 0:
                _fail(layer, bottoms, "more than one dim is -1", "Infer at most one axis.")
            inferred = i
            new.append(1)
        elif d < 0:
            _fail(layer, bottoms, f"dim {d} is invalid", "Use sizes >= -1.")
        else:
            new.append(d)
    top = list(b[:start]) + new + list(b[end:])
    total = count(b)
    explicit = math.prod(top)
    if inferred >= 0:
        if explicit == 0 or total % explicit:
            _fail(
                layer,
                bottoms,
                f"cannot infer the -1 dim of {dims}: {total} elements are "
                f"not a multiple of {explicit}",
                "Fix the shape.",
            )
        top[start + inferred] = total // explicit
    elif explicit != total:
        _fail(
            layer,
            bottoms,
            f"shape {tuple(top)} has {explicit} elements, the bottom has {total}",
            "Fix the shape so the element count is unchanged.",
        )
    return [tuple(top)]


@shape_rule("Crop", bottoms=(2, 2))
def _crop(layer: Layer, bottoms: list[Shape]) -> list[Shape | None]:
    if len(bottoms) != 2:
        _fail(layer, bottoms, "Crop needs two bottoms (data, reference)", "Add the reference.")
    a, ref = bottoms
    if len(a) != len(ref):
        _fail(
            layer,
            bottoms,
            "both bottoms must have the same number of axes",
            "Reshape the reference.",
        )
    axis = _axis(layer, int(_get(layer, "axis", 2)), a)
    offsets = _ints(_get(layer, "offset", []))
    n = len(a) - axis
    if len(offsets) not in (0, 1, n):
        _fail(
            layer,
            bottoms,
            f"{len(offsets)} offsets for {n} cropped axes",
            "Give no offset, one for all, or one per cropped axis.",
        )
    top = list(a)
    for i in range(axis, len(a)):
        off = 0 if not offsets else offsets[0] if len(offsets) == 1 else offsets[i - axis]
        if a[i] - off < ref[i]:
            _fail(
                layer,
                bottoms,
                f"axis {i}: size {ref[i]} at offset {off} does not fit in {a[i]}",
                "Lower the offset or crop to a smaller reference.",
            )
        top[i] = ref[i]
    return [tuple(top)]


@shape_rule("Tile")
def _tile(layer: Layer, bottoms: list[Shape]) -> list[Shape | None]:
    b = bottoms[0]
    axis = _axis(layer, int(_get(layer, "axis", 1)), b)
    tiles = int(_get(layer, "tiles", 0))
    if tiles <= 0:
        _fail(layer, bottoms, "tiles must be positive", "Set tiles.")
    return [b[:axis] + (b[axis] * tiles,) + b[axis + 1 :]]


@shape_rule("Permute")
def _permute(layer: Layer, bottoms: list[Shape]) -> list[Shape | None]:
    b = bottoms[0]
    order: list[int] = []
    for o in _ints(_get(layer, "order", [])):
        if not 0 <= o < len(b) or o in order:
            _fail(layer, bottoms, f"order {o} is out of range or repeated", "Fix order.")
        order.append(o)
    order += [i for i in range(len(b)) if i not in order]  # SSD: missing axes keep their order
    return [tuple(b[i] for i in order)]


# -- losses and metrics -----------------------------------------------------------------------
LOSS_TYPES = tuple(sorted(_LAYER_LOSS_TYPES))


@shape_rule(*LOSS_TYPES, bottoms=(2, 4))
def _loss(layer: Layer, bottoms: list[Shape]) -> list[Shape | None]:
    if len(bottoms) >= 2 and bottoms[0][:1] != bottoms[1][:1]:
        _fail(
            layer, bottoms, "data and label must have the same first axis", "Feed matching batches."
        )
    if layer.type == "EuclideanLoss" and count(bottoms[0][1:]) != count(bottoms[1][1:]):
        _fail(
            layer,
            bottoms,
            "both inputs must have the same count per item",
            "Feed predictions and targets of the same size.",
        )
    tops: list[Shape | None] = [()]
    if layer.type == "SoftmaxWithLoss":
        b = bottoms[0]
        axis = _axis(layer, int(_get(layer, "axis", 1)), b)
        if math.prod(b[:axis]) * math.prod(b[axis + 1 :]) != count(bottoms[1]):
            _fail(
                layer,
                bottoms,
                f"the label count must equal outer * inner of the predictions around axis {axis}",
                "Feed one label per prediction.",
            )
        tops.append(b)  # the second top is the softmax output
    return tops[: len(layer.tops)]


@shape_rule("Accuracy", bottoms=(2, 2))
def _accuracy(layer: Layer, bottoms: list[Shape]) -> list[Shape | None]:
    b = bottoms[0]
    axis = _axis(layer, int(_get(layer, "axis", 1)), b)
    if math.prod(b[:axis]) * math.prod(b[axis + 1 :]) != count(bottoms[1]):
        _fail(
            layer,
            bottoms,
            "the number of labels must match the number of predictions",
            "Feed one label per prediction.",
        )
    top_k = int(_get(layer, "top_k", 1))
    if top_k > count(b) // max(count(bottoms[1]), 1):
        _fail(layer, bottoms, f"top_k {top_k} exceeds the number of classes", "Lower top_k.")
    return [(), (b[axis],)][: len(layer.tops)]


@shape_rule("ArgMax")
def _argmax(layer: Layer, bottoms: list[Shape]) -> list[Shape | None]:
    b = bottoms[0]
    top_k = int(_get(layer, "top_k", 1))
    if _has(layer, "axis"):
        axis = _axis(layer, int(layer.attrs["axis"]), b)
        if b[axis] < top_k:
            _fail(layer, bottoms, f"top_k {top_k} exceeds axis {axis}'s size", "Lower top_k.")
        return [b[:axis] + (top_k,) + b[axis + 1 :]]
    if count(b[1:]) < top_k:
        _fail(layer, bottoms, f"top_k {top_k} exceeds the items' size", "Lower top_k.")
    shape = [1] * max(len(b), 3)
    shape[0] = b[0]
    shape[2] = top_k
    if bool(_get(layer, "out_max_val", False)):
        shape[1] = 2  # index and value
    return [tuple(shape)]


@shape_rule("Reduction")
def _reduction(layer: Layer, bottoms: list[Shape]) -> list[Shape | None]:
    b = bottoms[0]
    axis = _axis(layer, int(_get(layer, "axis", 0)), b) if b else 0
    return [b[:axis]]


@shape_rule("Parameter", bottoms=(0, 0))
def _parameter(layer: Layer, bottoms: list[Shape]) -> list[Shape | None]:
    return [_dims(_get(layer, "shape", {}))]


@param_rule("Parameter")
def _parameter_params(layer: Layer, bottoms: list[Shape]) -> list[Shape]:
    return [_dims(_get(layer, "shape", {}))]


# -- SSD and detection ------------------------------------------------------------------------
@shape_rule("Normalize")
def _normalize(layer: Layer, bottoms: list[Shape]) -> list[Shape | None]:
    if len(bottoms[0]) < 2:
        _fail(
            layer,
            bottoms,
            "Normalize needs a bottom with at least 2 axes",
            "Reshape the bottom to (N, C, ...).",
        )
    return [bottoms[0]]


@param_rule("Normalize")
def _normalize_params(layer: Layer, bottoms: list[Shape]) -> list[Shape]:
    if bool(_get(layer, "channel_shared", True)):
        return [(1,)]
    return [(bottoms[0][1],)]


def num_priors(layer: Layer) -> int:
    """The number of priors per location of an SSD ``PriorBox`` layer.

    Aspect ratio 1 is always there; each new ratio (1e-6 apart from those seen) adds itself and,
    with ``flip``, its inverse (not checked against the list, as in the SSD fork); every
    ``min_size`` multiplies that; every ``max_size`` adds one.
    """
    ratios = [1.0]
    flip = bool(_get(layer, "flip", True))
    for ar in _floats(_get(layer, "aspect_ratio", [])):
        if any(abs(ar - r) < 1e-6 for r in ratios):
            continue
        ratios.append(ar)
        if flip:
            ratios.append(1.0 / ar)
    min_sizes = _floats(_get(layer, "min_size", []))
    max_sizes = _floats(_get(layer, "max_size", []))
    return len(ratios) * len(min_sizes) + len(max_sizes)


@shape_rule("PriorBox", bottoms=(2, 2))
def _prior_box(layer: Layer, bottoms: list[Shape]) -> list[Shape | None]:
    min_sizes = _floats(_get(layer, "min_size", []))
    max_sizes = _floats(_get(layer, "max_size", []))
    if not min_sizes:
        _fail(layer, bottoms, "no min_size", "Set min_size.")
    if max_sizes and len(max_sizes) != len(min_sizes):
        _fail(
            layer,
            bottoms,
            f"{len(max_sizes)} max_size for {len(min_sizes)} min_size",
            "Give one max_size per min_size.",
        )
    for lo, hi in zip(min_sizes, max_sizes, strict=False):
        if hi <= lo:
            _fail(
                layer, bottoms, f"max_size {hi} must be greater than min_size {lo}", "Fix max_size."
            )
    b = bottoms[0]
    h, w = _legacy(b, 2), _legacy(b, 3)
    return [(1, 2, h * w * num_priors(layer) * 4)]


@shape_rule("DetectionOutput", bottoms=(3, 4))
def _detection_output(layer: Layer, bottoms: list[Shape]) -> list[Shape | None]:
    """Rows after forward depend on the data; we return the most Caffe can produce.

    Caffe's own ``Reshape`` says ``(1, 1, 1, 7)`` and ``Forward`` resizes to ``(1, 1, kept, 7)``
    with ``kept`` summed over the batch; per image at most ``keep_top_k`` (when >= 0) of the
    NMS survivors, which are at most ``top_k`` (or all priors) per non-background class.
    """
    if len(bottoms) < 3:
        _fail(
            layer,
            bottoms,
            "DetectionOutput needs loc, conf and prior bottoms",
            "Feed mbox_loc, mbox_conf and mbox_priorbox.",
        )
    loc, conf, prior = bottoms[:3]
    num_classes = int(_get(layer, "num_classes", 0))
    if num_classes <= 0:
        _fail(layer, bottoms, "num_classes must be set", "Set num_classes.")
    share = bool(_get(layer, "share_location", True))
    priors = _legacy(prior, 2) // 4
    if loc[0] != conf[0]:
        _fail(layer, bottoms, "loc and conf must have the same batch", "Feed matching batches.")
    if priors * (1 if share else num_classes) * 4 != _legacy(loc, 1):
        _fail(
            layer,
            bottoms,
            f"{priors} priors do not match the location predictions "
            f"({_legacy(loc, 1)} values per image)",
            "Check the mbox_loc concat and priors.",
        )
    if priors * num_classes != _legacy(conf, 1):
        _fail(
            layer,
            bottoms,
            f"{priors} priors x {num_classes} classes do not match the "
            f"confidences ({_legacy(conf, 1)} values per image)",
            "Check num_classes and the mbox_conf concat.",
        )
    nms = _get(layer, "nms_param", {}) or {}
    top_k = int(nms.get("top_k", -1))
    per_class = priors if top_k < 0 else min(top_k, priors)
    background = int(_get(layer, "background_label_id", 0))
    classes = num_classes - (1 if 0 <= background < num_classes else 0)
    per_image = classes * per_class
    keep = int(_get(layer, "keep_top_k", -1))
    if keep > -1:
        per_image = min(per_image, keep)
    rows = max(loc[0] * per_image, loc[0])  # no detection: one fake row per image
    return [(1, 1, rows, 7)]


# -- fork layers ------------------------------------------------------------------------------
@shape_rule("Upsample", bottoms=(1, 2))
def _upsample(layer: Layer, bottoms: list[Shape]) -> list[Shape | None]:
    b = bottoms[0]
    if len(b) != 4:
        _fail(layer, bottoms, "Upsample needs a 4-axis bottom", "Reshape to (N, C, H, W).")
    if len(bottoms) > 1 and bottoms[1] != b:
        _fail(
            layer,
            bottoms,
            "the mask (bottom[1]) must have bottom[0]'s shape",
            "Feed the Pooling mask of the matching layer.",
        )
    scale = int(_get(layer, "scale", 2))
    scale_h = int(_get(layer, "scale_h", scale)) if _has(layer, "scale_h") else scale
    scale_w = int(_get(layer, "scale_w", scale)) if _has(layer, "scale_w") else scale
    up_h = int(_get(layer, "upsample_h", 0))
    up_w = int(_get(layer, "upsample_w", 0))
    if up_h <= 0 or up_w <= 0:  # SegNet: the explicit size wins only when both are set
        up_h = b[2] * scale_h - int(bool(_get(layer, "pad_out_h", False)))
        up_w = b[3] * scale_w - int(bool(_get(layer, "pad_out_w", False)))
    return [(b[0], b[1], up_h, up_w)]


@shape_rule("Interp", bottoms=(1, 2))
def _interp(layer: Layer, bottoms: list[Shape]) -> list[Shape | None]:
    b = bottoms[0]
    if len(b) != 4:
        _fail(layer, bottoms, "Interp needs a 4-axis bottom", "Reshape to (N, C, H, W).")
    pad_beg = int(_get(layer, "pad_beg", 0))
    pad_end = int(_get(layer, "pad_end", 0))
    if pad_beg > 0 or pad_end > 0:
        _fail(layer, bottoms, "pad_beg/pad_end must be <= 0 (cropping only)", "Fix the pads.")
    h_eff, w_eff = b[2] + pad_beg + pad_end, b[3] + pad_beg + pad_end
    zoom, shrink = _has(layer, "zoom_factor"), _has(layer, "shrink_factor")
    explicit = _has(layer, "height") and _has(layer, "width")
    if len(bottoms) > 1:  # PSPNet: size taken from the second bottom
        if zoom or shrink or explicit:
            _fail(
                layer,
                bottoms,
                "a second bottom and a size parameter are ambiguous",
                "Remove one of them.",
            )
        h, w = _legacy(bottoms[1], 2), _legacy(bottoms[1], 3)
    elif shrink and not zoom:
        s = int(layer.attrs["shrink_factor"])
        h, w = (h_eff - 1) // s + 1, (w_eff - 1) // s + 1
    elif zoom and not shrink:
        z = int(layer.attrs["zoom_factor"])
        h, w = h_eff + (h_eff - 1) * (z - 1), w_eff + (w_eff - 1) * (z - 1)
    elif explicit:
        h, w = int(layer.attrs["height"]), int(layer.attrs["width"])
    elif zoom and shrink:  # shrink first, then zoom
        s, z = int(layer.attrs["shrink_factor"]), int(layer.attrs["zoom_factor"])
        h, w = (h_eff - 1) // s + 1, (w_eff - 1) // s + 1
        h, w = h + (h - 1) * (z - 1), w + (w - 1) * (z - 1)
    else:
        _fail(
            layer,
            bottoms,
            "no output size",
            "Set zoom_factor, shrink_factor, or height and width, or give a second bottom.",
        )
    if h_eff <= 0 or w_eff <= 0 or h <= 0 or w <= 0:
        _fail(layer, bottoms, f"output size ({h}, {w}) is not positive", "Fix the parameters.")
    return [(b[0], b[1], h, w)]


@shape_rule("ShuffleChannel")
def _shuffle_channel(layer: Layer, bottoms: list[Shape]) -> list[Shape | None]:
    b = bottoms[0]
    group = int(_get(layer, "group", 1))
    if len(b) < 2 or group <= 0 or b[1] % group:
        _fail(layer, bottoms, f"group {group} must divide the channels", "Fix group.")
    return [b]


@shape_rule("ROIPooling", bottoms=(2, 2))
def _roi_pooling(layer: Layer, bottoms: list[Shape]) -> list[Shape | None]:
    ph, pw = int(_get(layer, "pooled_h", 0)), int(_get(layer, "pooled_w", 0))
    if ph <= 0 or pw <= 0:
        _fail(layer, bottoms, "pooled_h and pooled_w must be positive", "Set them.")
    return [(bottoms[1][0], _legacy(bottoms[0], 1), ph, pw)]


@shape_rule("PSROIPooling", bottoms=(2, 2))
def _psroi_pooling(layer: Layer, bottoms: list[Shape]) -> list[Shape | None]:
    out = int(_get(layer, "output_dim", 0))
    g = int(_get(layer, "group_size", 0))
    if out <= 0 or g <= 0:
        _fail(layer, bottoms, "output_dim and group_size must be positive", "Set them.")
    if _legacy(bottoms[0], 1) != out * g * g:
        _fail(
            layer,
            bottoms,
            f"input channels must be output_dim * group_size^2 = {out * g * g}",
            "Fix output_dim/group_size or the score map's num_output.",
        )
    return [(bottoms[1][0], out, g, g)]


@shape_rule("Axpy", bottoms=(3, 3))
def _axpy(layer: Layer, bottoms: list[Shape]) -> list[Shape | None]:
    if len(bottoms) != 3:
        _fail(layer, bottoms, "Axpy needs three bottoms (a, x, y)", "Feed a, x and y.")
    a, x, y = bottoms
    if x != y or a[:2] != x[:2] or any(d != 1 for d in a[2:]):
        _fail(
            layer,
            bottoms,
            "Axpy needs a of shape (N, C, 1, 1) and x, y of equal (N, C, ...)",
            "Fix the inputs.",
        )
    return [x]


_IMAGE_SOURCES = {"Data": "data_param", "AnnotatedData": "data_param",
                  "ImageData": "image_data_param", "WindowData": "window_data_param",
                  "VideoData": "video_data_param", "ImageLabelmapData": "image_data_param"}


def guess_dataset_shapes(
    flow: Dataflow,
    given: Mapping[str, Sequence[int]] | None = None,
    *,
    assume_channels: int | None = 3,
) -> tuple[dict[str, Shape], dict[str, str]]:
    """Shapes for dataset layers that their parameters imply, with a note per data top.

    Rules, for a source layer (no bottoms) of an image-reading type:

    1. N = its ``batch_size``; H, W = ``transform_param.crop_size``, else ImageData's
       ``new_height``/``new_width``. Without both, the layer is left unknown.
    2. C = the channels the first Convolution reading the blob expects from its *loaded*
       weights (``weight.shape[1] * group``), else the number of ``mean_value`` entries when
       there are several, else 1 for ImageData with ``is_color: false``, else
       ``assume_channels`` (3 = BGR images; None leaves the layer unknown). The note says which.
    3. A second top (the label) gets ``(N,)``.
    4. A data top found in ``given`` keeps that shape and sets the label's batch.
    """
    given = given or {}
    shapes: dict[str, Shape] = {}
    notes: dict[str, str] = {}  # by data top name
    for node in flow.nodes:
        layer = node.layer
        pfield = _IMAGE_SOURCES.get(layer.type)
        if pfield is None or node.inputs or not layer.tops:
            continue
        if layer.tops[0] in given:  # rule 4
            if len(layer.tops) > 1 and layer.tops[1] not in given:
                shapes[layer.tops[1]] = (int(given[layer.tops[0]][0]),)
            continue
        params = layer.attrs if layer.param_field == pfield else layer.extra.get(pfield, {})
        batch = int(params.get("batch_size", 0) or 0)
        transform = layer.extra.get("transform_param", {})
        h = w = int(transform.get("crop_size", 0) or 0)
        if not h and layer.type in ("ImageData", "ImageLabelmapData"):
            h, w = int(params.get("new_height", 0)), int(params.get("new_width", 0))
        if not (batch and h and w):  # rule 1
            continue
        channels, why = _guess_channels(flow, node, params, transform, assume_channels)
        if channels is None:
            continue
        shapes[layer.tops[0]] = (batch, channels, h, w)
        if len(layer.tops) > 1:  # rule 3
            shapes[layer.tops[1]] = (batch,)
        notes[layer.tops[0]] = (
            f"{layer.name!r} ({flow.state.phase}): {layer.tops[0]} taken as "
            f"{batch}x{channels}x{h}x{w} (batch_size, channels {why}, crop/resize); "
            "override with --input-shape"
        )
    return shapes, notes


def starting_shapes(
    flow: Dataflow, given: Mapping[str, Sequence[int]] | None = None
) -> tuple[dict[str, Shape], dict[str, str]]:
    """The input shapes every verb starts shape inference from, and the assumptions made.

    The one rule shared by ``info``, the ops, the exports, ``verify`` and ``extract``:
    shapes in ``given`` (``--input-shape``, by top name) win; every other dataset layer's tops
    get :func:`guess_dataset_shapes`' values (batch_size, crop size, channels from the first
    convolution's loaded weights or the mean values, else 3). ``Input`` layers keep their own
    shapes unless ``given`` names them.

    Args:
        flow: the resolved net (one phase).
        given: explicit shapes by top name.

    Returns:
        ``(shapes by top name, {guessed data top: note})``: pass the shapes to
        :func:`infer` and report the notes (``info``'s ``assumptions``).
    """
    given = {k: tuple(int(d) for d in v) for k, v in (given or {}).items()}
    guessed, notes = guess_dataset_shapes(flow, given)
    return {**guessed, **given}, notes


def _guess_channels(
    flow: Dataflow, node: Any, params: dict[str, Any], transform: dict[str, Any],
    assume: int | None,
) -> tuple[int | None, str]:
    for consumer, _ in flow.consumers(node.outputs[0]):
        blobs = consumer.layer.params
        if consumer.layer.type == "Convolution" and blobs and blobs[0].data is not None:
            if blobs[0].data.ndim == 4:
                group = int(consumer.layer.attrs.get("group", 1))
                return int(blobs[0].data.shape[1]) * group, (
                    f"from {consumer.layer.name!r}'s weights"
                )
    means = transform.get("mean_value", [])
    if len(means) > 1:
        return len(means), f"from {len(means)} mean_value entries"
    if node.layer.type == "ImageData" and not params.get("is_color", True):
        return 1, "is_color: false"
    if assume is None:
        return None, ""
    return assume, f"assumed {assume}" + (" (BGR images)" if assume == 3 else "")
