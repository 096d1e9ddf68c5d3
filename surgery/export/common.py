"""Lowering facts shared by every exporter (ONNX and PyTorch).

Both exporters walk the same :class:`ExportPlan`: the dataflow resolved for one phase, with the
layers that have no meaning at inference dropped (and noted), every unsupported layer collected
up front into one :class:`~surgery.errors.UnsupportedLayerError`, and SSD nets cut at
``DetectionOutput`` when the exporter does not lower it (its bottoms become outputs).

The per-type helpers read a layer's parameters through :func:`surgery.layers.attr` (so proto
defaults come from the descriptor) and return plain numbers or numpy arrays: nothing here
imports torch or onnx.

Caffe rules reproduced here (see ``CAFFE_RULES.md``):

1. Convolution geometry: ``kernel_size``/``pad``/``stride``/``dilation`` repeated once for all
   spatial axes or once per axis, or written as ``*_h``/``*_w``; output rounds down.
2. Pooling geometry: ``ceil((H + 2p - k) / s) + 1`` (``round_mode: CEIL``, or the forks'
   ``ceil_mode``); when any pad is non-zero and the last window starts at or past ``H + p``,
   one fewer output (both axes checked when either pad is set). ``global_pooling`` takes the
   whole plane. MAX ignores padded positions; AVE divides by the window clipped to ``H + p``
   (padding counts, the overhang past it does not).
3. BatchNorm: ``mean = blob0 / blob2``, ``var = blob1 / blob2`` with a zero factor meaning 0;
   ``use_global_stats`` defaults to true in TEST and false in TRAIN; the running averages use
   ``moving_average_fraction`` (PyTorch momentum ``1 - maf``).
4. LRN ACROSS_CHANNELS: ``x / (k + alpha/n * sum_n x^2)^beta``; WITHIN_CHANNEL:
   ``x / (1 + alpha * avgpool_nxn(x^2))^beta`` with pad ``(n-1)/2`` (k ignored).
5. The forks' BN (:func:`surgery.layers.bn_layout`). PSPNet (hszhao/PSPNet, yjxiong/caffe
   ``bn_layer.cpp``), blobs ``[slope, bias, mean, var]``: with ``frozen`` or in TEST
   ``y = slope * (x - mean) * (var + eps)^-0.5 + bias`` (var is the variance); in TRAIN
   unfrozen, this batch's mean and biased variance over (N, H, W), the stored ones updated as
   ``m * stored + (1 - m) * batch`` (``momentum`` m). SegNet (alexgkendall/caffe-segnet),
   blobs ``[scale, shift]``: ``bn_mode: INFERENCE`` gives ``y = scale * x + shift``; LEARN
   (the default, in every phase) normalises by this batch's statistics,
   ``var = E(x^2) - E(x)^2``, eps fixed at 1e-9, then scales and shifts.
"""

from __future__ import annotations

import keyword
import math
import re
import unicodedata
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..dataflow import Dataflow, Node, Value, resolve
from ..errors import NetError, UnsupportedLayerError, did_you_mean
from ..layers import attr, bn_layout, is_data, is_loss
from ..layers import floats as _floats
from ..layers import ints as _ints
from ..net import Layer, Net, NetState

__all__ = [
    "requested_values",
    "METRIC_TYPES",
    "ConvGeometry",
    "conv_geometry",
    "PoolGeometry",
    "pool_geometry",
    "pool_output_size",
    "pool_output_hw",
    "pool_pads",
    "pool_ave_divisor",
    "BatchNormFacts",
    "batch_norm_facts",
    "BNFacts",
    "bn_facts",
    "LRNFacts",
    "lrn_facts",
    "eltwise_facts",
    "canonical_axis",
    "crop_offsets",
    "slice_points",
    "permute_order",
    "scale_axes",
    "prior_boxes",
    "detection_output_facts",
    "loss_weights",
    "loss_facts",
    "phase_of",
    "clean_float",
    "py_identifier",
    "Dropped",
    "ExportPlan",
    "plan",
    "split_blob_values",
]

#: Types that compute metrics or swallow blobs; never lowered.
METRIC_TYPES = frozenset({"Accuracy", "Silence", "DetectionEvaluate", "HDF5Output"})


def clean_float(v: float) -> float:
    """A float32 proto value as the decimal the file wrote (0.30000001192 -> 0.3)."""
    return float(f"{float(v):.7g}")


def phase_of(phase: str | NetState) -> NetState:
    """A :class:`NetState` from ``'test'``/``'train'`` (any case) or a state."""
    if isinstance(phase, NetState):
        return phase
    return NetState(str(phase).upper())


def canonical_axis(axis: int, ndim: int) -> int:
    """Caffe's ``CanonicalAxisIndex``: a negative axis counts from the end.

    Raises:
        NetError: the axis is out of range.
    """
    if not -ndim <= axis < max(ndim, 1):
        raise NetError(f"axis {axis} is out of range for a {ndim}-axis blob")
    return axis + ndim if axis < 0 else axis


# -- convolution ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ConvGeometry:
    """Normalized Convolution/Deconvolution parameters (one entry per spatial axis).

    Attributes:
        kernel: kernel size per spatial axis.
        pad: symmetric padding per spatial axis.
        stride: stride per spatial axis.
        dilation: dilation per spatial axis.
        group: number of groups.
        num_output: output channels.
        bias_term: whether blob 1 (bias) exists.
        axis: the channel axis (Caffe's ``axis``, 1 by default).
    """

    kernel: tuple[int, ...]
    pad: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    group: int
    num_output: int
    bias_term: bool
    axis: int = 1

    @property
    def num_spatial(self) -> int:
        return len(self.kernel)


def _per_axis(layer: Layer, key: str, hw: str, default: int, n: int) -> tuple[int, ...]:
    h, w = f"{hw}_h", f"{hw}_w"
    if h in layer.attrs or w in layer.attrs:
        return (int(attr(layer, h, default)), int(attr(layer, w, default)))
    vals = _ints(attr(layer, key, []))
    if not vals:
        return (default,) * n
    if len(vals) == 1:
        return (vals[0],) * n
    if len(vals) != n:
        raise NetError(
            f"layer {layer.name!r} ({layer.type}): {key} has {len(vals)} values for {n} "
            "spatial axes; give one for all axes or one per axis"
        )
    return tuple(vals)


def conv_geometry(layer: Layer, num_spatial: int = 2) -> ConvGeometry:
    """Rule 1: the geometry of a Convolution/Deconvolution layer.

    Args:
        layer: a Convolution, Deconvolution or depthwise-convolution layer.
        num_spatial: spatial axes of the bottom (2 for N, C, H, W); ``*_h``/``*_w`` force 2.

    Raises:
        NetError: inconsistent per-axis values.
    """
    if any(f"{k}_{s}" in layer.attrs for k in ("kernel", "pad", "stride") for s in "hw"):
        num_spatial = 2
    kernel = _per_axis(layer, "kernel_size", "kernel", 0, num_spatial)
    pad = _per_axis(layer, "pad", "pad", 0, num_spatial)
    stride = _per_axis(layer, "stride", "stride", 1, num_spatial)
    dil = _ints(attr(layer, "dilation", []))
    dilation = (
        (1,) * num_spatial if not dil else (dil[0],) * num_spatial if len(dil) == 1 else tuple(dil)
    )
    return ConvGeometry(
        kernel=kernel,
        pad=pad,
        stride=stride,
        dilation=dilation,
        group=int(attr(layer, "group", 1)),
        num_output=int(attr(layer, "num_output", 0)),
        bias_term=bool(attr(layer, "bias_term", True)),
        axis=int(attr(layer, "axis", 1)),
    )


# -- pooling ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class PoolGeometry:
    """Normalized Pooling parameters (rule 2).

    Attributes:
        method: ``"MAX"``, ``"AVE"`` or ``"STOCHASTIC"``.
        kernel: (kh, kw); for ``global_pooling`` the bottom's (H, W) once known, else None.
        stride: (sh, sw).
        pad: (ph, pw).
        ceil: True for Caffe's default CEIL rounding.
        global_pooling: pool the whole plane.
    """

    method: str
    kernel: tuple[int, int] | None
    stride: tuple[int, int]
    pad: tuple[int, int]
    ceil: bool = True
    global_pooling: bool = False

    def resolved(self, in_hw: Sequence[int]) -> PoolGeometry:
        """The geometry with a global kernel replaced by ``in_hw``."""
        if not self.global_pooling:
            return self
        return PoolGeometry(
            self.method, (int(in_hw[0]), int(in_hw[1])), (1, 1), (0, 0), self.ceil, True
        )


def _pool_hw(layer: Layer, key: str, default: int) -> tuple[int, int]:
    base = "kernel_size" if key == "kernel" else key
    h, w = f"{key}_h", f"{key}_w"
    if h in layer.attrs or w in layer.attrs:
        return int(attr(layer, h, default)), int(attr(layer, w, default))
    vals = _ints(attr(layer, base, default))
    v = vals[0] if vals else default
    return v, v


def pool_geometry(layer: Layer) -> PoolGeometry:
    """Rule 2: a Pooling layer's parameters, defaults applied.

    ``ceil`` follows BVLC's ``round_mode`` (CEIL by default) or the forks' ``ceil_mode`` bool.
    """
    if "ceil_mode" in layer.attrs:
        ceil = bool(layer.attrs["ceil_mode"])
    else:
        ceil = str(attr(layer, "round_mode", "CEIL")) == "CEIL"
    glob = bool(attr(layer, "global_pooling", False))
    return PoolGeometry(
        method=str(attr(layer, "pool", "MAX")),
        kernel=None if glob else _pool_hw(layer, "kernel", 0),
        stride=(1, 1) if glob else _pool_hw(layer, "stride", 1),
        pad=(0, 0) if glob else _pool_hw(layer, "pad", 0),
        ceil=ceil,
        global_pooling=glob,
    )


def pool_output_size(size: int, k: int, p: int, s: int, ceil: bool, any_pad: bool) -> int:
    """Caffe's pooled size on one axis (rule 2); ``any_pad`` = either pad is non-zero."""
    span = size + 2 * p - k
    out = (-(-span // s) if ceil else span // s) + 1
    if any_pad and (out - 1) * s >= size + p:
        out -= 1
    return out


def pool_output_hw(geom: PoolGeometry, in_hw: Sequence[int]) -> tuple[int, int]:
    """Caffe's pooled (H, W) for a bottom plane of ``in_hw``."""
    g = geom.resolved(in_hw)
    assert g.kernel is not None
    any_pad = bool(g.pad[0] or g.pad[1])
    return (
        pool_output_size(int(in_hw[0]), g.kernel[0], g.pad[0], g.stride[0], g.ceil, any_pad),
        pool_output_size(int(in_hw[1]), g.kernel[1], g.pad[1], g.stride[1], g.ceil, any_pad),
    )


def pool_pads(geom: PoolGeometry, in_hw: Sequence[int]) -> tuple[int, int, int, int]:
    """Explicit pads ``(top, left, bottom, right)`` for a pad-free, floor-rounded pooling.

    Padding the bottom by these amounts (bottom/right may be negative: a crop) and pooling with
    no padding gives exactly Caffe's output size: the extra end padding covers the ceil-mode
    overhang. Pad with -inf (or the float minimum) for MAX and 0 for AVE; AVE then needs
    :func:`pool_ave_divisor` instead of the window area.
    """
    g = geom.resolved(in_hw)
    assert g.kernel is not None
    oh, ow = pool_output_hw(g, in_hw)
    ends = [
        (o - 1) * s + k - size - p
        for o, s, k, size, p in zip((oh, ow), g.stride, g.kernel, in_hw, g.pad, strict=True)
    ]
    return g.pad[0], g.pad[1], ends[0], ends[1]


def pool_ave_divisor(geom: PoolGeometry, in_hw: Sequence[int]) -> np.ndarray:
    """Caffe's AVE divisor per output position, shape (out_h, out_w), float32.

    The window from ``o*s - p`` is clipped to ``H + p`` (padding counts, the ceil overhang past
    it does not), exactly as ``PoolingLayer::Forward_cpu``.
    """
    g = geom.resolved(in_hw)
    assert g.kernel is not None
    out = pool_output_hw(g, in_hw)
    sizes = []
    for o, s, k, size, p in zip(out, g.stride, g.kernel, in_hw, g.pad, strict=True):
        start = np.arange(o) * s - p
        end = np.minimum(start + k, size + p)
        sizes.append((end - start).astype(np.float32))
    return np.outer(sizes[0], sizes[1]).astype(np.float32)


# -- normalization ----------------------------------------------------------------------------
@dataclass(frozen=True)
class BatchNormFacts:
    """Rule 3: what a Caffe BatchNorm computes.

    Attributes:
        mean: running mean (blob0 / blob2), float32, or None without weights.
        var: running variance (blob1 / blob2), float32, or None without weights.
        factor: blob2's value (0 when absent).
        eps: epsilon added to the variance.
        use_global_stats: True/False when the layer sets it, None = follow the phase.
        momentum: PyTorch momentum ``1 - moving_average_fraction``.
    """

    mean: np.ndarray | None
    var: np.ndarray | None
    factor: float
    eps: float
    use_global_stats: bool | None
    momentum: float

    def global_stats(self, phase: str) -> bool:
        """Whether the running statistics are used in ``phase`` ('TEST'/'TRAIN')."""
        if self.use_global_stats is not None:
            return self.use_global_stats
        return phase.upper() == "TEST"


def batch_norm_facts(layer: Layer) -> BatchNormFacts:
    """Rule 3 for one BatchNorm layer (a zero factor gives zero statistics)."""
    blobs = [p.data for p in layer.params]
    mean = var = None
    factor = 0.0
    if len(blobs) >= 3 and all(b is not None for b in blobs[:3]):
        factor = float(np.asarray(blobs[2]).reshape(-1)[0])
        # float32 multiply by the reciprocal, as Caffe does
        scale = np.float32(0.0 if factor == 0 else 1.0 / np.float32(factor))
        mean = (np.asarray(blobs[0], np.float32).reshape(-1) * scale).astype(np.float32)
        var = (np.asarray(blobs[1], np.float32).reshape(-1) * scale).astype(np.float32)
    ugs = layer.attrs.get("use_global_stats")
    return BatchNormFacts(
        mean=mean,
        var=var,
        factor=factor,
        eps=float(attr(layer, "eps", 1e-5)),
        use_global_stats=None if ugs is None else bool(ugs),
        momentum=1.0 - clean_float(attr(layer, "moving_average_fraction", 0.999)),
    )


@dataclass(frozen=True)
class BNFacts:
    """Rule 5: what the forks' BN layer computes.

    Attributes:
        layout: ``"pspnet"`` (4 blobs) or ``"segnet"`` (2 blobs).
        scale: slope/scale per channel (C,), float32, or None without weights.
        shift: bias/shift per channel (C,), or None.
        mean: PSPNet's stored mean (C,), or None (SegNet, or no weights).
        var: PSPNet's stored variance (C,), or None.
        eps: added to the variance (PSPNet ``eps``; SegNet's fixed 1e-9).
        frozen: PSPNet ``frozen``: the stored statistics in every phase.
        momentum: PSPNet ``momentum`` m: ``stored = m * stored + (1 - m) * batch``.
        mode: SegNet ``bn_mode`` (``"LEARN"``/``"INFERENCE"``); None for PSPNet.
    """

    layout: str
    scale: np.ndarray | None
    shift: np.ndarray | None
    mean: np.ndarray | None
    var: np.ndarray | None
    eps: float
    frozen: bool
    momentum: float
    mode: str | None

    def global_stats(self, phase: str) -> bool:
        """Whether the stored statistics are used in ``phase`` (SegNet has none)."""
        if self.layout == "segnet":
            return False
        return self.frozen or phase.upper() == "TEST"


def bn_facts(layer: Layer) -> BNFacts:
    """Rule 5 for one BN layer.

    Raises:
        UnsupportedLayerError: the fork cannot be told (:func:`surgery.layers.bn_layout`).
    """
    layout = bn_layout(layer)
    n = 4 if layout == "pspnet" else 2
    blobs = [p.data for p in layer.params[:n]]
    vals: list[np.ndarray | None] = [None] * 4
    if len(blobs) == n and all(b is not None for b in blobs):
        for i, b in enumerate(blobs):
            vals[i] = np.asarray(b, np.float32).reshape(-1)
    if layout == "segnet":
        raw = layer.attrs.get("bn_mode", "LEARN")
        mode = {0: "LEARN", 1: "INFERENCE"}.get(raw, str(raw).upper()) if not isinstance(
            raw, bool) else str(raw)
        if mode not in ("LEARN", "INFERENCE"):
            raise UnsupportedLayerError(f"layer {layer.name!r} (BN): bn_mode {raw!r}; SegNet's "
                                        "BN knows LEARN and INFERENCE")
        return BNFacts(layout, vals[0], vals[1], None, None, 1e-9, False, 0.0, mode)
    return BNFacts(
        layout, vals[0], vals[1], vals[2], vals[3],
        eps=clean_float(attr(layer, "eps", 1e-5)),
        frozen=bool(attr(layer, "frozen", False)),
        momentum=clean_float(attr(layer, "momentum", 0.9)),
        mode=None,
    )


@dataclass(frozen=True)
class LRNFacts:
    """Rule 4: LRN parameters. ``k`` is ignored (1) by Caffe for WITHIN_CHANNEL."""

    local_size: int
    alpha: float
    beta: float
    k: float
    region: str  # "ACROSS_CHANNELS" | "WITHIN_CHANNEL"

    @property
    def pad(self) -> int:
        return (self.local_size - 1) // 2


def lrn_facts(layer: Layer) -> LRNFacts:
    """Rule 4 for one LRN layer."""
    return LRNFacts(
        local_size=int(attr(layer, "local_size", 5)),
        alpha=float(attr(layer, "alpha", 1.0)),
        beta=float(attr(layer, "beta", 0.75)),
        k=float(attr(layer, "k", 1.0)),
        region=str(attr(layer, "norm_region", "ACROSS_CHANNELS")),
    )


def eltwise_facts(layer: Layer) -> tuple[str, list[float]]:
    """``(operation, coeffs)``; coeffs has one entry per bottom (1.0 when not written)."""
    op = str(attr(layer, "operation", "SUM"))
    coeff = _floats(attr(layer, "coeff", []))
    if not coeff:
        coeff = [1.0] * len(layer.bottoms)
    return op, coeff


# -- shape-moving layers ----------------------------------------------------------------------
def crop_offsets(layer: Layer, ndim: int) -> tuple[int, list[int]]:
    """``(axis, offsets)`` for Crop: one offset per cropped axis from ``axis`` on."""
    axis = canonical_axis(int(attr(layer, "axis", 2)), ndim)
    offs = _ints(attr(layer, "offset", []))
    n = ndim - axis
    if not offs:
        return axis, [0] * n
    if len(offs) == 1:
        return axis, offs * n
    return axis, offs


def slice_points(layer: Layer, size: int, ntops: int) -> list[int]:
    """The sizes of Slice's tops along its axis (``slice_point`` or equal parts)."""
    points = _ints(attr(layer, "slice_point", []))
    if not points:
        return [size // ntops] * ntops
    bounds = [0, *points, size]
    return [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def permute_order(layer: Layer, ndim: int) -> list[int]:
    """SSD Permute's full axis order (axes not listed keep their order at the end)."""
    order = _ints(attr(layer, "order", []))
    return order + [i for i in range(ndim) if i not in order]


def scale_axes(layer: Layer, bottom_ndim: int, factor_ndim: int) -> tuple[int, int]:
    """``(axis, num_axes)`` a Scale/Bias factor covers in bottom[0] (``factor_ndim`` axes)."""
    if factor_ndim == 0:
        return 0, 0
    axis = canonical_axis(int(attr(layer, "axis", 1)), bottom_ndim)
    return axis, factor_ndim


# -- SSD --------------------------------------------------------------------------------------
def prior_boxes(layer: Layer, feat_hw: Sequence[int], img_hw: Sequence[int]) -> np.ndarray:
    """The SSD PriorBox top (1, 2, H*W*num_priors*4): boxes then variances, float32.

    Follows ``prior_box_layer.cpp`` (weiliu89/caffe ssd): centers ``(w + offset) * step``,
    the min-size box, then ``sqrt(min*max)``, then the other aspect ratios; optional clip.

    Args:
        layer: the PriorBox layer.
        feat_hw: bottom[0]'s (H, W) (the feature map).
        img_hw: bottom[1]'s (H, W) (the image), used unless ``img_size``/``img_h``/``img_w``.
    """
    f32 = np.float32
    min_sizes = _floats(attr(layer, "min_size", []))
    max_sizes = _floats(attr(layer, "max_size", []))
    flip = bool(attr(layer, "flip", True))
    clip = bool(attr(layer, "clip", False))
    variance = _floats(attr(layer, "variance", [])) or [0.1]
    ratios = [1.0]
    for ar in _floats(attr(layer, "aspect_ratio", [])):
        if any(abs(ar - r) < 1e-6 for r in ratios):
            continue
        ratios.append(ar)
        if flip:
            ratios.append(float(f32(1.0) / f32(ar)))
    img_h = int(attr(layer, "img_h", 0)) or int(attr(layer, "img_size", 0))
    img_w = int(attr(layer, "img_w", 0)) or int(attr(layer, "img_size", 0))
    if not img_h or not img_w:
        img_h, img_w = int(img_hw[0]), int(img_hw[1])
    step_h = float(attr(layer, "step_h", 0.0)) or float(attr(layer, "step", 0.0))
    step_w = float(attr(layer, "step_w", 0.0)) or float(attr(layer, "step", 0.0))
    lh, lw = int(feat_hw[0]), int(feat_hw[1])
    if not step_h or not step_w:
        step_h, step_w = f32(img_h) / f32(lh), f32(img_w) / f32(lw)
    step_h, step_w = f32(step_h), f32(step_w)
    offset = f32(attr(layer, "offset", 0.5))
    boxes: list[tuple[float, float]] = []  # (box_w, box_h) per prior, in order
    for s, mn in enumerate(min_sizes):
        mn32 = f32(mn)
        boxes.append((mn32, mn32))
        if max_sizes:
            side = f32(np.sqrt(f32(mn32 * f32(max_sizes[s]))))
            boxes.append((side, side))
        for ar in ratios:
            if abs(ar - 1.0) < 1e-6:
                continue
            r = f32(np.sqrt(f32(ar)))
            boxes.append((f32(mn32 * r), f32(mn32 / r)))
    bw = np.array([b[0] for b in boxes], np.float64)
    bh = np.array([b[1] for b in boxes], np.float64)
    cy = ((np.arange(lh, dtype=np.float32) + offset) * step_h).astype(np.float64)
    cx = ((np.arange(lw, dtype=np.float32) + offset) * step_w).astype(np.float64)
    cy = cy[:, None, None]
    cx = cx[None, :, None]
    out = np.stack(
        np.broadcast_arrays(
            (cx - bw / 2.0) / img_w,
            (cy - bh / 2.0) / img_h,
            (cx + bw / 2.0) / img_w,
            (cy + bh / 2.0) / img_h,
        ),
        axis=-1,
    ).astype(np.float32)
    if clip:
        out = np.clip(out, 0.0, 1.0)
    flat = out.reshape(-1)
    var = np.broadcast_to(
        np.array(variance if len(variance) == 4 else variance[:1] * 4, np.float32), out.shape
    ).reshape(-1)
    return np.stack([flat, var])[None].astype(np.float32)


def detection_output_facts(layer: Layer) -> dict[str, Any]:
    """DetectionOutput's parameters with SSD defaults, as a plain dict."""
    nms = dict(attr(layer, "nms_param", {}) or {})
    return {
        "num_classes": int(attr(layer, "num_classes", 0)),
        "share_location": bool(attr(layer, "share_location", True)),
        "background_label_id": int(attr(layer, "background_label_id", 0)),
        "code_type": str(attr(layer, "code_type", "CORNER")),
        "variance_encoded_in_target": bool(attr(layer, "variance_encoded_in_target", False)),
        "keep_top_k": int(attr(layer, "keep_top_k", -1)),
        "confidence_threshold": float(
            attr(layer, "confidence_threshold", -math.inf)
            if "confidence_threshold" in layer.attrs
            else -math.inf
        ),
        "nms_threshold": float(nms.get("nms_threshold", 0.3)),
        "top_k": int(nms.get("top_k", -1)),
        "eta": float(nms.get("eta", 1.0)),
    }


# -- training heads ---------------------------------------------------------------------------
def loss_facts(layer: Layer) -> tuple[int | None, str]:
    """``(ignore_label, normalization)`` of a loss layer's ``loss_param``.

    Caffe's rule: ``normalization`` when written; else the legacy ``normalize`` bool (true:
    VALID, false: BATCH_SIZE); else VALID for SoftmaxWithLoss and BATCH_SIZE otherwise.

    Raises:
        UnsupportedLayerError: SegNet's class-weighted loss (``weight_by_label_freqs``,
            ``class_weighting``), which no lowering computes.
    """
    lp = layer.extra.get("loss_param", {}) or {}
    if lp.get("weight_by_label_freqs") or lp.get("class_weighting"):
        raise UnsupportedLayerError(
            f"layer {layer.name!r} ({layer.type}): SegNet's class-weighted loss "
            "(loss_param weight_by_label_freqs/class_weighting) is not lowered; export in TEST "
            "(losses dropped) or remove the weighting"
        )
    ignore = lp.get("ignore_label")
    if "normalization" in lp:
        norm = str(lp["normalization"])
    elif "normalize" in lp:
        norm = "VALID" if lp["normalize"] else "BATCH_SIZE"
    else:
        norm = "VALID" if layer.type == "SoftmaxWithLoss" else "BATCH_SIZE"
    return (None if ignore is None else int(ignore)), norm


def loss_weights(layer: Layer) -> list[float]:
    """The ``loss_weight`` per top (Caffe: 1 for the first top of a loss layer, else 0)."""
    lw = layer.extra.get("loss_weight")
    if lw is not None:
        vals = [clean_float(x) for x in _floats(lw)]
        return vals + [0.0] * (len(layer.tops) - len(vals))
    if is_loss(layer):
        return [1.0] + [0.0] * (len(layer.tops) - 1)
    return [0.0] * len(layer.tops)


# -- names ------------------------------------------------------------------------------------
def py_identifier(name: str, taken: Collection[str] = (), prefix: str = "l_") -> str:
    """A safe, readable Python identifier for a Caffe name, not in ``taken``.

    Non-identifier characters become ``_`` (accents are stripped, other non-ASCII
    characters replaced), a leading digit or a keyword gets ``prefix``, dunder-looking names are
    defused, and a numeric suffix dedupes.
    """
    text = unicodedata.normalize("NFKD", name)  # "ü" -> "u" + combining mark, dropped below
    text = "".join(ch for ch in text if not unicodedata.combining(ch))
    text = re.sub(r"[^0-9A-Za-z_]", "_", text.encode("ascii", "replace").decode("ascii"))
    text = re.sub(r"_+", "_", text).strip("_") or "blob"
    if text[0].isdigit() or keyword.iskeyword(text) or keyword.issoftkeyword(text):
        text = prefix + text
    if text in {"self", "torch", "nn", "F", "math", "forward", "training", "inputs"}:
        text = prefix + text
    out, i = text, 1
    while out in taken:
        out = f"{text}_{i}"
        i += 1
    return out


# -- the export plan --------------------------------------------------------------------------
@dataclass(frozen=True)
class Dropped:
    """A layer left out of an export, and why."""

    node: Node
    reason: str


@dataclass
class ExportPlan:
    """What an exporter lowers, for one phase.

    Attributes:
        net: the net.
        state: the phase state.
        flow: the resolved dataflow (all included layers).
        nodes: the nodes to lower, in topological (file) order. Data layers are not in it.
        inputs: graph inputs: tops of ``Input`` layers, of data layers consumed by lowered
            nodes, and ``input_shapes`` names; one :class:`Value` each.
        outputs: the values the export returns (Caffe's net outputs after dropping, plus the
            bottoms of a cut ``DetectionOutput``), in order, without inputs.
        losses: TRAIN only: ``(value, loss_weight)`` of each loss top with a non-zero weight.
        dropped: layers left out, with reasons.
        notes: one line per dropped layer or cut, for reports.
        shapes: :class:`~surgery.shapes.ShapeInfo` when shapes could be inferred, else None.
        start_shapes: the input shapes shape inference starts from: ``input_shapes`` plus
            what the dataset layers imply (:func:`surgery.shapes.starting_shapes`).
        assumptions: one line per data input whose shape was guessed (also in ``notes``).
    """

    net: Net
    state: NetState
    flow: Dataflow
    nodes: list[Node]
    inputs: list[Value]
    outputs: list[Value]
    losses: list[tuple[Value, float]] = field(default_factory=list)
    dropped: list[Dropped] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    shapes: Any = None
    start_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    assumptions: list[str] = field(default_factory=list)

    @property
    def phase(self) -> str:
        return self.state.phase

    def input_shape(self, value: Value) -> tuple[int, ...] | None:
        """The inferred shape of an input (or any value), None when unknown."""
        if self.shapes is None:
            return None
        try:
            return self.shapes.shape(value)
        except KeyError:
            return None


def plan(
    net: Net,
    phase: str | NetState = "test",
    *,
    supported: Collection[str],
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    lower_detection_output: bool = False,
    lower_losses: bool | None = None,
    infer_shapes: bool = True,
    outputs: Sequence[str] | None = None,
    lower_metrics: bool = False,
) -> ExportPlan:
    """Resolve ``net`` for ``phase`` and decide what an exporter lowers.

    Rules, in order:

    1. Data layers (:func:`surgery.layers.is_data`) are never lowered: their consumed tops
       become graph inputs, named after the tops. ``Input`` layers likewise.
    2. Accuracy, Silence and other metric layers are dropped (noted).
    3. Loss layers are dropped in TEST (noted); in TRAIN they are lowered when
       ``lower_losses`` (default: TRAIN), and their tops with a non-zero ``loss_weight``
       become :attr:`ExportPlan.losses`.
    4. ``DetectionOutput`` is lowered only with ``lower_detection_output``; otherwise it is
       dropped and its bottoms (``mbox_loc``, ``mbox_conf_flatten``, ``mbox_priorbox``)
       become outputs.
    5. Layers whose type is not in ``supported`` are collected, and one
       :class:`UnsupportedLayerError` names them all before anything is lowered; so are
       layers that set fields our schema does not know (:attr:`Layer.verbatim`: a fork's
       field may change what the layer computes).
    6. Outputs are Caffe's: values produced by lowered nodes and not consumed by a later
       lowered node (in-place versions included), plus the cut bottoms of rule 4.
    7. With ``outputs`` (blob names), those are the outputs instead: each name means the blob's
       last version (Caffe's blob after the forward pass: after an in-place ReLU or Dropout),
       ``<blob>@<layer>`` the version ``<layer>`` wrote; only the layers they depend on are
       lowered (later layers may be unsupported or lack weights).

    Args:
        net: the net.
        phase: ``"test"``/``"train"`` or a :class:`NetState`.
        supported: the layer types the exporter's table lowers.
        input_shapes: shapes by input/top name (override the ``Input`` layer's shapes); a
            data layer's tops not given get what ``surgery info`` infers
            (:func:`surgery.shapes.starting_shapes`), each guess noted.
        lower_detection_output: the exporter lowers DetectionOutput itself.
        lower_losses: lower loss layers (default: True in TRAIN, False in TEST).
        infer_shapes: run :func:`surgery.shapes.infer` (errors there propagate).
        outputs: blob names to return (rule 7); default Caffe's outputs.
        lower_metrics: keep ``Accuracy`` layers (the exporter lowers them; rule 2 otherwise).

    Raises:
        UnsupportedLayerError: one or more layers have no lowering (all named).
        NetError: the net does not resolve for this phase.
        ShapeMismatchError: shape inference failed.
    """
    state = phase_of(phase)
    flow = resolve(net, state)
    wanted = None if outputs is None else requested_values(flow, outputs)
    needed: set[int] | None = None
    if wanted is not None:
        needed = {id(n) for v in wanted if v.producer is not None
                  for n in flow.ancestors(v.producer)}
    train = state.phase == "TRAIN"
    if lower_losses is None:
        lower_losses = train
    nodes: list[Node] = []
    dropped: list[Dropped] = []
    notes: list[str] = []
    sources: list[Node] = []
    cut_outputs: list[Value] = []
    unsupported: list[Node] = []
    unknown_fields: list[Node] = []
    for node in flow.nodes:
        layer = node.layer
        if needed is not None and id(node) not in needed:
            continue  # rule 7
        if (
            layer.type == "Input"
            or is_data(layer)
            or (layer.type in ("DummyData", "MemoryData") and not layer.bottoms)
        ):
            sources.append(node)
            continue
        if layer.type in METRIC_TYPES and not (lower_metrics and layer.type == "Accuracy"):
            dropped.append(Dropped(node, f"{layer.type} has no meaning in an exported model"))
            continue
        if is_loss(layer) and not lower_losses:
            dropped.append(Dropped(node, f"loss layer dropped in {state.phase}"))
            continue
        if layer.type == "DetectionOutput" and not lower_detection_output:
            dropped.append(Dropped(node, "DetectionOutput not lowered: its bottoms are outputs"))
            cut_outputs.extend(v for v in node.inputs if v not in cut_outputs)
            continue
        if layer.type not in supported:
            unsupported.append(node)
            continue
        if layer.verbatim:
            unknown_fields.append(node)
            continue
        nodes.append(node)
    if unknown_fields:
        listed = "; ".join(
            f"{n.layer.name!r} ({n.layer.type}): "
            + ", ".join(f"{v.dotted} ({v.where})" for v in n.layer.verbatim)
            for n in unknown_fields
        )
        what = (f"{len(unknown_fields)} layer(s) set fields our schema does not know, so what "
                f"they compute is unknown: {listed}")
        if unsupported:
            what += "; and " + ", ".join(f"{n.layer.name!r} ({n.layer.type})"
                                         for n in unsupported) + " have unsupported types"
        raise UnsupportedLayerError(
            f"cannot export{' ' + net.source if net.source else ''} in {state.phase}: {what}. "
            "Remove those fields if they do not change the result, or export the part of the "
            "net before these layers."
        )
    if unsupported:
        listed = ", ".join(f"{n.layer.name!r} ({n.layer.type})" for n in unsupported)
        types = sorted({n.layer.type for n in unsupported})
        raise UnsupportedLayerError(
            f"{len(unsupported)} layer(s) cannot be exported"
            f"{' from ' + net.source if net.source else ''}"
            f" in {state.phase}: {listed}. Unsupported type(s): {', '.join(types)}. Remove or "
            "replace these layers (surgery ops), or export the part of the net before them."
        )
    # Nodes downstream of a cut DetectionOutput cannot run: drop them too (rare).
    cut_ids = {id(d.node) for d in dropped if d.node.layer.type == "DetectionOutput"}
    if cut_ids:
        kept: list[Node] = []
        dead: set[int] = set(cut_ids)
        for node in nodes:
            if any(id(v.producer) in dead for v in node.inputs):
                dead.add(id(node))
                dropped.append(Dropped(node, "downstream of a cut DetectionOutput"))
            else:
                kept.append(node)
        nodes = kept
    lowered = {id(n) for n in nodes}
    consumed_sources: set[int] = set()
    for node in nodes:
        for v in node.inputs:
            consumed_sources.add(id(v))
    inputs: list[Value] = []
    given = set(input_shapes or {})
    for src in sources:
        for v in src.outputs:
            if src.layer.type == "Input" or id(v) in consumed_sources or v.name in given:
                inputs.append(v)
        unused = [v.name for v in src.outputs if v not in inputs]
        if src.layer.type != "Input":
            notes.append(
                f"data layer {src.layer.name!r} ({src.layer.type}) became graph input(s) "
                f"{[v.name for v in src.outputs if v in inputs]}"
                + (f"; unused top(s) {unused} left out" if unused else "")
            )
    for d in dropped:
        notes.append(f"dropped {d.node.layer.name!r} ({d.node.layer.type}): {d.reason}")
    # Rule 6: Caffe's available-blobs rule over the lowered nodes only.
    available: dict[int, Value] = {}
    for node in nodes:
        for v in node.inputs:
            available.pop(id(v), None)
        for v in node.outputs:
            available[id(v)] = v
    outs = list(available.values())
    for v in cut_outputs:
        if v not in outs and (id(v.producer) in lowered):
            outs.append(v)
    if wanted is not None:
        outs = list(wanted)
        skipped = sum(1 for n in flow.nodes if id(n) not in needed)
        if skipped:
            notes.append(f"outputs {', '.join(outputs or [])}: {skipped} layer(s) after them "
                         "not exported")
    losses: list[tuple[Value, float]] = []
    if lower_losses:
        for node in nodes:
            for v, w in zip(node.outputs, loss_weights(node.layer), strict=True):
                if w != 0.0:
                    losses.append((v, w))
    from ..shapes import infer, starting_shapes

    start, guesses = starting_shapes(flow, input_shapes)
    input_names = {v.name for v in inputs}
    assumptions = [line for top, line in guesses.items() if top in input_names]
    notes += [f"assumed: {line}" for line in assumptions]
    shapes = None
    if infer_shapes:
        shapes = infer(flow, start, check_weights=False)
    return ExportPlan(net, state, flow, nodes, inputs, outs, losses, dropped, notes, shapes,
                      start, assumptions)


def requested_values(flow: Dataflow, names: Sequence[str]) -> list[Value]:
    """The values that blob names designate, one per name: a name is the blob's last version
    (what Caffe's blob holds after the forward pass), ``<blob>@<layer>`` the version
    ``<layer>`` wrote.

    Raises:
        NetError: an unknown name (with the closest blob names), or no names.
    """
    if not names:
        raise NetError("no output blob named; give one or more blob names")
    out: list[Value] = []
    for name in names:
        blob, at, layer = name.partition("@")
        if not at:
            v = flow.latest(name)  # raises with a did-you-mean
        else:
            found = [v for n in flow.nodes if n.layer.name == layer for v in n.outputs
                     if v.name == blob]
            if not found:
                raise NetError(f"no layer {layer!r} writing blob {blob!r} in the "
                               f"{flow.state.phase} net" + did_you_mean(name, [
                                   f"{v.name}@{n.layer.name}" for n in flow.nodes
                                   for v in n.outputs]))
            v = found[0]
        out.append(v)
    return out


def split_blob_values(flow: Dataflow) -> dict[str, Value]:
    """Caffe's automatic split blobs (``<blob>_<layer>_<i>_split_<j>``) -> the value they copy.

    Caffe's ``InsertSplits`` gives every extra reader of a top its own copy named
    ``SplitBlobName(layer, blob, top index, reader index)``; goldens and caffemodels carry these
    names. Every reader index up to the consumer count is listed.
    """
    out: dict[str, Value] = {}
    for node in flow.nodes:
        for v in node.outputs:
            readers = len(flow.consumers(v))
            if readers > 1:
                for j in range(readers):
                    out[f"{v.name}_{node.layer.name}_{v.top_index}_split_{j}"] = v
    return out
