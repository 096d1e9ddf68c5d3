"""A small numpy reference of Caffe's layer semantics, for single-layer export tests.

Written from Caffe's ``*_layer.cpp`` loops rather than from the exporters' lowering facts, so a
shared misunderstanding shows up as a test failure: pooling walks each window with Caffe's
``hstart``/``hend`` clipping and AVE ``pool_size``; LRN sums squares over a zero-padded
channel window (ACROSS) or pools them (WITHIN); Deconvolution scatters each input pixel.
Float64 inside, float32 out. Only TEST-phase forward passes.

Use :func:`forward` (``forward(layer, bottoms) -> tops``); :func:`supported_types` lists
the types covered. :func:`run_net` runs a whole net with it, in float64 throughout (the
``reference64`` backend of ``surgery verify``: a yardstick without float32 rounding, to tell
rounding amplified by depth from a lowering that computes something else).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from ..layers import attr
from ..net import Layer, Net

__all__ = ["forward", "forward64", "run_net", "supported_types", "reference"]

Ref = Callable[[Layer, list[np.ndarray]], list[np.ndarray]]
_REF: dict[str, Ref] = {}


def reference(*types: str) -> Callable[[Ref], Ref]:
    """Register the reference forward of ``types`` (twice is an error)."""

    def deco(fn: Ref) -> Ref:
        for t in types:
            if t in _REF:
                raise ValueError(f"{t!r} already has a reference")
            _REF[t] = fn
        return fn

    return deco


def supported_types() -> frozenset[str]:
    """Types :func:`forward` knows."""
    return frozenset(_REF)


def forward(layer: Layer, bottoms: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Caffe's TEST forward of one layer on float arrays; returns float32 tops.

    Raises:
        KeyError: no reference for the type.
    """
    xs = [np.asarray(b, np.float64) for b in bottoms]
    return [np.asarray(t, np.float32) for t in _REF[layer.type](layer, xs)]


def forward64(layer: Layer, bottoms: Sequence[np.ndarray]) -> list[np.ndarray]:
    """:func:`forward` without the final rounding: float64 tops.

    Raises:
        KeyError: no reference for the type.
    """
    xs = [np.asarray(b, np.float64) for b in bottoms]
    return [np.asarray(t, np.float64) for t in _REF[layer.type](layer, xs)]


def run_net(
    net: Net, inputs: Mapping[str, np.ndarray], phase: str = "TEST", *,
    round32: bool = False,
) -> dict[str, np.ndarray]:
    """Run ``net`` layer by layer with the reference, every blob kept.

    Rules:

    1. The layers are the TEST export's (:func:`surgery.export.common.plan`: data layers become
       the inputs, losses and metrics are dropped), in net order.
    2. Values stay float64 from the inputs to the last layer (``round32=True`` rounds every
       top to float32, as a float32 framework stores its blobs; the arithmetic inside a layer
       stays float64).
    3. Blobs are named as the exports name them: the last version of a name under the name
       (Caffe's blob after the forward pass), earlier in-place versions ``<blob>@<layer>``.

    Args:
        net: the net with its weights.
        inputs: arrays by input name.
        phase: only "TEST" has a reference.
        round32: round each top to float32.

    Returns:
        ``{blob name: float64 array}``, inputs included.

    Raises:
        UnsupportedLayerError: layers without a reference (all named).
        SurgeryError: a missing input, or a phase other than TEST.
    """
    from ..errors import SurgeryError
    from .common import plan

    if phase.upper() != "TEST":
        raise SurgeryError("the numpy reference runs TEST-phase forward passes only")
    p = plan(net, "TEST", supported=supported_types(), infer_shapes=False)
    env: dict[int, np.ndarray] = {}
    out: dict[str, np.ndarray] = {}
    for v in p.inputs:
        if v.name not in inputs:
            raise SurgeryError(f"no input array for {v.name!r}")
        env[id(v)] = np.asarray(inputs[v.name], np.float64)
        out[v.name] = env[id(v)]
    for node in p.nodes:
        tops = _REF[node.layer.type](node.layer, [env[id(v)] for v in node.inputs])
        for v, t in zip(node.outputs, tops, strict=True):
            t = np.asarray(t, np.float64)
            if round32:
                t = t.astype(np.float32).astype(np.float64)
            env[id(v)] = t
            latest = p.flow.latest(v.name) is v
            out[v.name if latest else f"{v.name}@{node.layer.name}"] = t
    return out


def _blob(layer: Layer, i: int) -> np.ndarray:
    data = layer.params[i].data
    assert data is not None, f"{layer.name}: blob {i} missing"
    return np.asarray(data, np.float64)


def _ints(v: object) -> list[int]:
    if v is None:
        return []
    if isinstance(v, (list, tuple)):
        return [int(x) for x in v]
    return [int(v)]  # type: ignore[call-overload]


def _hw(layer: Layer, key: str, base: str, default: int) -> tuple[int, int]:
    if f"{key}_h" in layer.attrs or f"{key}_w" in layer.attrs:
        return int(attr(layer, f"{key}_h", default)), int(attr(layer, f"{key}_w", default))
    v = _ints(attr(layer, base, []))
    return (v[0], v[0]) if len(v) == 1 else (v[0], v[1]) if len(v) == 2 else (default, default)


def _axis(a: int, n: int) -> int:
    return a + n if a < 0 else a


# -- convolution ------------------------------------------------------------------------------
def _conv_params(layer: Layer) -> tuple[tuple[int, int], ...]:
    k = _hw(layer, "kernel", "kernel_size", 0)
    p = _hw(layer, "pad", "pad", 0)
    s = _hw(layer, "stride", "stride", 1)
    d = _ints(attr(layer, "dilation", [])) or [1]
    dil = (d[0], d[0]) if len(d) == 1 else (d[0], d[1])
    return k, p, s, dil


@reference("Convolution")
def _conv(layer: Layer, xs: list[np.ndarray]) -> list[np.ndarray]:
    (kh, kw), (ph, pw), (sh, sw), (dh, dw) = _conv_params(layer)
    w = _blob(layer, 0)
    g = int(attr(layer, "group", 1))
    x = np.pad(xs[0], ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    n, c, h, wd = x.shape
    co = w.shape[0]
    oh = (h - (dh * (kh - 1) + 1)) // sh + 1
    ow = (wd - (dw * (kw - 1) + 1)) // sw + 1
    out = np.zeros((n, co, oh, ow))
    cig, cog = c // g, co // g
    for gi in range(g):
        xg = x[:, gi * cig : (gi + 1) * cig]
        wg = w[gi * cog : (gi + 1) * cog]
        for i in range(kh):
            for j in range(kw):
                patch = xg[:, :, i * dh : i * dh + sh * (oh - 1) + 1 : sh,
                           j * dw : j * dw + sw * (ow - 1) + 1 : sw]
                # sum over c of patch[n,c,h,w] * w[o,c]: tensordot (BLAS), as einsum nchw,oc
                out[:, gi * cog : (gi + 1) * cog] += np.tensordot(
                    patch, wg[:, :, i, j], axes=([1], [1])).transpose(0, 3, 1, 2)
    if bool(attr(layer, "bias_term", True)):
        out += _blob(layer, 1).reshape(1, -1, 1, 1)
    return [out]


@reference("Deconvolution")
def _deconv(layer: Layer, xs: list[np.ndarray]) -> list[np.ndarray]:
    (kh, kw), (ph, pw), (sh, sw), (dh, dw) = _conv_params(layer)
    w = _blob(layer, 0)  # (C_in, C_out/group, kh, kw)
    g = int(attr(layer, "group", 1))
    x = xs[0]
    n, c, h, wd = x.shape
    cog = w.shape[1]
    full_h = sh * (h - 1) + dh * (kh - 1) + 1
    full_w = sw * (wd - 1) + dw * (kw - 1) + 1
    out = np.zeros((n, cog * g, full_h, full_w))
    cig = c // g
    for gi in range(g):
        xg = x[:, gi * cig : (gi + 1) * cig]
        wg = w[gi * cig : (gi + 1) * cig]
        for i in range(kh):
            for j in range(kw):
                contrib = np.tensordot(xg, wg[:, :, i, j], axes=([1], [0])).transpose(
                    0, 3, 1, 2)
                out[:, gi * cog : (gi + 1) * cog, i * dh : i * dh + sh * (h - 1) + 1 : sh,
                    j * dw : j * dw + sw * (wd - 1) + 1 : sw] += contrib
    out = out[:, :, ph : full_h - ph, pw : full_w - pw]
    if bool(attr(layer, "bias_term", True)):
        out = out + _blob(layer, 1).reshape(1, -1, 1, 1)
    return [out]


@reference("InnerProduct")
def _ip(layer: Layer, xs: list[np.ndarray]) -> list[np.ndarray]:
    x = xs[0]
    axis = _axis(int(attr(layer, "axis", 1)), x.ndim)
    flat = x.reshape(int(np.prod(x.shape[:axis])), -1)
    w = _blob(layer, 0)
    y = flat @ (w if bool(attr(layer, "transpose", False)) else w.T)
    if bool(attr(layer, "bias_term", True)):
        y = y + _blob(layer, 1)
    return [y.reshape(x.shape[:axis] + (-1,))]


# -- pooling ----------------------------------------------------------------------------------
@reference("Pooling")
def _pool(layer: Layer, xs: list[np.ndarray]) -> list[np.ndarray]:
    x = xs[0]
    n, c, h, w = x.shape
    method = str(attr(layer, "pool", "MAX"))
    if bool(attr(layer, "global_pooling", False)):
        (kh, kw), (ph, pw), (sh, sw) = (h, w), (0, 0), (1, 1)
    else:
        kh, kw = _hw(layer, "kernel", "kernel_size", 0)
        ph, pw = _hw(layer, "pad", "pad", 0)
        sh, sw = _hw(layer, "stride", "stride", 1)
    if "ceil_mode" in layer.attrs:
        ceil = bool(layer.attrs["ceil_mode"])
    else:
        ceil = str(attr(layer, "round_mode", "CEIL")) == "CEIL"
    rnd = math.ceil if ceil else math.floor
    oh = int(rnd((h + 2 * ph - kh) / sh)) + 1
    ow = int(rnd((w + 2 * pw - kw) / sw)) + 1
    if ph or pw:
        if (oh - 1) * sh >= h + ph:
            oh -= 1
        if (ow - 1) * sw >= w + pw:
            ow -= 1
    out = np.zeros((n, c, oh, ow))
    for i in range(oh):
        for j in range(ow):
            if method == "MAX":
                hs, ws = i * sh - ph, j * sw - pw
                he, we = min(hs + kh, h), min(ws + kw, w)
                hs, ws = max(hs, 0), max(ws, 0)
                win = x[:, :, hs:he, ws:we].reshape(n, c, -1)
                out[:, :, i, j] = win.max(-1) if win.shape[-1] else -np.finfo(np.float32).max
            elif method == "AVE":
                hs, ws = i * sh - ph, j * sw - pw
                he, we = min(hs + kh, h + ph), min(ws + kw, w + pw)
                size = (he - hs) * (we - ws)
                hs, ws = max(hs, 0), max(ws, 0)
                he, we = min(he, h), min(we, w)
                out[:, :, i, j] = x[:, :, hs:he, ws:we].sum((-1, -2)) / size
            else:  # STOCHASTIC, TEST rule
                hs, ws = i * sh, j * sw
                he, we = min(hs + kh, h), min(ws + kw, w)
                win = x[:, :, hs:he, ws:we]
                out[:, :, i, j] = (win * win).sum((-1, -2)) / (
                    win.sum((-1, -2)) + np.finfo(np.float32).tiny)
    return [out]


# -- activations ------------------------------------------------------------------------------
@reference("ReLU")
def _relu(layer: Layer, xs: list[np.ndarray]) -> list[np.ndarray]:
    s = float(attr(layer, "negative_slope", 0.0))
    return [np.maximum(xs[0], 0) + s * np.minimum(xs[0], 0)]


@reference("PReLU")
def _prelu(layer: Layer, xs: list[np.ndarray]) -> list[np.ndarray]:
    x = xs[0]
    a = _blob(layer, 0)
    a = a.reshape((1, -1) + (1,) * (x.ndim - 2)) if a.size > 1 else a.reshape(())
    return [np.maximum(x, 0) + a * np.minimum(x, 0)]


@reference("Sigmoid")
def _sigmoid(layer: Layer, xs: list[np.ndarray]) -> list[np.ndarray]:
    return [0.5 * np.tanh(0.5 * xs[0]) + 0.5]


@reference("TanH")
def _tanh(layer: Layer, xs: list[np.ndarray]) -> list[np.ndarray]:
    return [np.tanh(xs[0])]


@reference("ELU")
def _elu(layer: Layer, xs: list[np.ndarray]) -> list[np.ndarray]:
    a = float(attr(layer, "alpha", 1.0))
    x = xs[0]
    return [np.where(x > 0, x, a * (np.exp(np.minimum(x, 0)) - 1))]


@reference("AbsVal")
def _abs(layer: Layer, xs: list[np.ndarray]) -> list[np.ndarray]:
    return [np.abs(xs[0])]


@reference("Power")
def _power(layer: Layer, xs: list[np.ndarray]) -> list[np.ndarray]:
    p, s, sh = (float(attr(layer, k, d)) for k, d in (("power", 1.0), ("scale", 1.0),
                                                       ("shift", 0.0)))
    return [np.power(sh + s * xs[0], p)]


@reference("Exp")
def _exp(layer: Layer, xs: list[np.ndarray]) -> list[np.ndarray]:
    b, s, sh = (float(attr(layer, k, d)) for k, d in (("base", -1.0), ("scale", 1.0),
                                                       ("shift", 0.0)))
    base = math.e if b == -1.0 else b
    return [np.power(base, sh + s * xs[0])]


@reference("Log")
def _log(layer: Layer, xs: list[np.ndarray]) -> list[np.ndarray]:
    b, s, sh = (float(attr(layer, k, d)) for k, d in (("base", -1.0), ("scale", 1.0),
                                                       ("shift", 0.0)))
    y = np.log(sh + s * xs[0])
    return [y if b == -1.0 else y / math.log(b)]


@reference("BNLL")
def _bnll(layer: Layer, xs: list[np.ndarray]) -> list[np.ndarray]:
    x = xs[0]
    return [np.where(x > 0, x + np.log1p(np.exp(-np.abs(x))), np.log1p(np.exp(np.minimum(x, 0))))]


@reference("Threshold")
def _threshold(layer: Layer, xs: list[np.ndarray]) -> list[np.ndarray]:
    return [(xs[0] > float(attr(layer, "threshold", 0.0))).astype(np.float64)]


@reference("Clip")
def _clip(layer: Layer, xs: list[np.ndarray]) -> list[np.ndarray]:
    return [np.clip(xs[0], float(attr(layer, "min", 0.0)), float(attr(layer, "max", 0.0)))]


@reference("Swish")
def _swish(layer: Layer, xs: list[np.ndarray]) -> list[np.ndarray]:
    b = float(attr(layer, "beta", 1.0))
    return [xs[0] / (1 + np.exp(-b * xs[0]))]


@reference("Split")
def _identity(layer: Layer, xs: list[np.ndarray]) -> list[np.ndarray]:
    return [xs[0]] * len(layer.tops)


@reference("Dropout")
def _dropout(layer: Layer, xs: list[np.ndarray]) -> list[np.ndarray]:
    # TEST: a copy; the Fast R-CNN fork's scale_train: false scales at TEST by 1 / scale_
    if bool(attr(layer, "scale_train", True)):
        return [xs[0]]
    return [xs[0] * (1.0 - float(attr(layer, "dropout_ratio", 0.5)))]


# -- normalization ----------------------------------------------------------------------------
@reference("BatchNorm")
def _bn(layer: Layer, xs: list[np.ndarray]) -> list[np.ndarray]:
    x = xs[0]
    shape = (1, -1) + (1,) * (x.ndim - 2)
    if bool(layer.attrs.get("use_global_stats", True)):  # TEST's default
        f = float(_blob(layer, 2).reshape(-1)[0])
        s = 0.0 if f == 0 else 1.0 / f
        mean = (_blob(layer, 0) * s).reshape(shape)
        var = (_blob(layer, 1) * s).reshape(shape)
    else:  # use_global_stats: false -- this batch's statistics, var = E((X - EX)^2)
        axes = (0, *range(2, x.ndim))
        mean = x.mean(axes, keepdims=True)
        var = ((x - mean) ** 2).mean(axes, keepdims=True)
    return [(x - mean) / np.sqrt(var + float(attr(layer, "eps", 1e-5)))]


@reference("BN")
def _fork_bn(layer: Layer, xs: list[np.ndarray]) -> list[np.ndarray]:
    """The forks' BN at TEST, from their ``bn_layer.cpp`` Forward_cpu."""
    x = xs[0]
    n, c = x.shape[:2]
    shape = (1, c) + (1,) * (x.ndim - 2)
    blobs = [p for p in layer.params if p.data is not None]
    scale = _blob(layer, 0).reshape(shape)
    shift = _blob(layer, 1).reshape(shape)
    if len(blobs) == 4:
        # hszhao/PSPNet: TEST (or frozen) copies blobs 2/3, adds eps, powx(-0.5), multiplies
        mean = _blob(layer, 2).reshape(shape)
        inv_std = (_blob(layer, 3) + float(attr(layer, "eps", 1e-5))) ** -0.5
        return [(x - mean) * inv_std.reshape(shape) * scale + shift]
    if str(layer.attrs.get("bn_mode", "LEARN")) in ("INFERENCE", "1"):
        return [x * scale + shift]  # caffe-segnet INFERENCE: scale, then shift
    # caffe-segnet LEARN (every phase): E(X) and E(X^2) over the spatial axes, then the batch
    flat = x.reshape(n, c, -1)
    mean = flat.mean(2).mean(0)
    var = (flat**2).mean(2).mean(0) - mean**2
    norm = (x - mean.reshape(shape)) / np.sqrt(var + 1e-9).reshape(shape)
    return [norm * scale + shift]


@reference("LRN")
def _lrn(layer: Layer, xs: list[np.ndarray]) -> list[np.ndarray]:
    x = xs[0]
    n = int(attr(layer, "local_size", 5))
    alpha = float(attr(layer, "alpha", 1.0))
    beta = float(attr(layer, "beta", 0.75))
    k = float(attr(layer, "k", 1.0))
    pre = (n - 1) // 2
    sq = x * x
    if str(attr(layer, "norm_region", "ACROSS_CHANNELS")) == "ACROSS_CHANNELS":
        c = x.shape[1]
        padded = np.pad(sq, ((0, 0), (pre, n - 1 - pre), (0, 0), (0, 0)))
        acc = sum(padded[:, i : i + c] for i in range(n))
        return [x * np.power(k + alpha / n * acc, -beta)]
    # WITHIN_CHANNEL: AVE pooling (Caffe's divisor) of x^2, then (1 + alpha * .)^-beta
    pool = Layer("p", "Pooling", attrs={"pool": "AVE", "kernel_size": [n], "pad": [pre],
                                        "stride": [1]})
    avg = _pool(pool, [sq])[0]
    return [x * np.power(1.0 + alpha * avg, -beta)]


@reference("Normalize")
def _normalize(layer: Layer, xs: list[np.ndarray]) -> list[np.ndarray]:
    x = xs[0]
    eps = float(attr(layer, "eps", 1e-10))
    axes = tuple(range(1, x.ndim)) if bool(attr(layer, "across_spatial", True)) else (1,)
    y = x / np.sqrt((x * x).sum(axes, keepdims=True) + eps)
    s = _blob(layer, 0)
    return [y * (s.reshape((1, -1) + (1,) * (x.ndim - 2)) if s.size > 1 else s.reshape(()))]


@reference("MVN")
def _mvn(layer: Layer, xs: list[np.ndarray]) -> list[np.ndarray]:
    x = xs[0]
    axes = tuple(range(1, x.ndim)) if bool(attr(layer, "across_channels", False)) else tuple(
        range(2, x.ndim))
    y = x - x.mean(axes, keepdims=True)
    if bool(attr(layer, "normalize_variance", True)):
        y = y / (np.sqrt((y * y).mean(axes, keepdims=True)) + float(attr(layer, "eps", 1e-9)))
    return [y]


@reference("Softmax")
def _softmax(layer: Layer, xs: list[np.ndarray]) -> list[np.ndarray]:
    x = xs[0]
    axis = _axis(int(attr(layer, "axis", 1)), x.ndim)
    e = np.exp(x - x.max(axis, keepdims=True))
    return [e / e.sum(axis, keepdims=True)]


# -- scale, bias, eltwise ---------------------------------------------------------------------
def _factor(layer: Layer, x: np.ndarray, f: np.ndarray, axis_default: int = 1) -> np.ndarray:
    if f.ndim == 0:
        return f
    axis = _axis(int(attr(layer, "axis", axis_default)), x.ndim)
    return f.reshape((1,) * axis + f.shape + (1,) * (x.ndim - axis - f.ndim))


@reference("Scale")
def _scale(layer: Layer, xs: list[np.ndarray]) -> list[np.ndarray]:
    x = xs[0]
    two = len(xs) > 1
    s = xs[1] if two else _blob(layer, 0)
    y = x * _factor(layer, x, s)
    if bool(attr(layer, "bias_term", False)):
        y = y + _factor(layer, x, _blob(layer, 0 if two else 1))
    return [y]


@reference("Bias")
def _bias(layer: Layer, xs: list[np.ndarray]) -> list[np.ndarray]:
    b = xs[1] if len(xs) > 1 else _blob(layer, 0)
    return [xs[0] + _factor(layer, xs[0], b)]


@reference("Eltwise")
def _eltwise(layer: Layer, xs: list[np.ndarray]) -> list[np.ndarray]:
    op = str(attr(layer, "operation", "SUM"))
    if op == "PROD":
        return [np.prod(np.stack(xs), 0)]
    if op == "MAX":
        return [np.max(np.stack(xs), 0)]
    coeff = [float(c) for c in attr(layer, "coeff", [])] or [1.0] * len(xs)
    return [sum(c * x for c, x in zip(coeff, xs, strict=True))]


# -- shape layers -----------------------------------------------------------------------------
@reference("Concat")
def _concat(layer: Layer, xs: list[np.ndarray]) -> list[np.ndarray]:
    axis = int(layer.attrs["concat_dim"]) if "concat_dim" in layer.attrs else _axis(
        int(attr(layer, "axis", 1)), xs[0].ndim)
    return [np.concatenate(xs, axis)]


@reference("Slice")
def _slice(layer: Layer, xs: list[np.ndarray]) -> list[np.ndarray]:
    x = xs[0]
    axis = int(layer.attrs["slice_dim"]) if "slice_dim" in layer.attrs else _axis(
        int(attr(layer, "axis", 1)), x.ndim)
    points = _ints(attr(layer, "slice_point", []))
    if not points:
        step = x.shape[axis] // len(layer.tops)
        points = [step * i for i in range(1, len(layer.tops))]
    return list(np.split(x, points, axis))


@reference("Flatten")
def _flatten(layer: Layer, xs: list[np.ndarray]) -> list[np.ndarray]:
    x = xs[0]
    a = _axis(int(attr(layer, "axis", 1)), x.ndim)
    e = _axis(int(attr(layer, "end_axis", -1)), x.ndim)
    return [x.reshape(x.shape[:a] + (-1,) + x.shape[e + 1 :])]


@reference("Reshape")
def _reshape(layer: Layer, xs: list[np.ndarray]) -> list[np.ndarray]:
    x = xs[0]
    dims = [int(d) for d in (attr(layer, "shape", {}) or {}).get("dim", [])]
    axis = int(attr(layer, "axis", 0))
    num_axes = int(attr(layer, "num_axes", -1))
    start = axis if axis >= 0 else x.ndim + axis + 1
    end = x.ndim if num_axes == -1 else start + num_axes
    new = [x.shape[start + i] if d == 0 else d for i, d in enumerate(dims)]
    return [x.reshape(list(x.shape[:start]) + new + list(x.shape[end:]))]


@reference("Crop")
def _crop(layer: Layer, xs: list[np.ndarray]) -> list[np.ndarray]:
    x, ref = xs
    axis = _axis(int(attr(layer, "axis", 2)), x.ndim)
    offs = _ints(attr(layer, "offset", []))
    idx = []
    for i in range(x.ndim):
        if i < axis:
            idx.append(slice(None))
            continue
        o = 0 if not offs else offs[0] if len(offs) == 1 else offs[i - axis]
        idx.append(slice(o, o + ref.shape[i]))
    return [x[tuple(idx)]]


@reference("Tile")
def _tile(layer: Layer, xs: list[np.ndarray]) -> list[np.ndarray]:
    x = xs[0]
    axis = _axis(int(attr(layer, "axis", 1)), x.ndim)
    reps = [1] * x.ndim
    reps[axis] = int(attr(layer, "tiles", 1))
    return [np.tile(x, reps)]


@reference("Permute")
def _permute(layer: Layer, xs: list[np.ndarray]) -> list[np.ndarray]:
    x = xs[0]
    order = _ints(attr(layer, "order", []))
    order += [i for i in range(x.ndim) if i not in order]
    return [np.transpose(x, order)]


def _caffe_order(x: np.ndarray, axis: int) -> np.ndarray:
    """Indices sorting ``(value, index)`` pairs descending along ``axis``, as ArgMax's
    ``std::partial_sort(..., std::greater<std::pair<Dtype, int>>())``: among equal values the
    higher index comes first."""
    n = x.shape[axis]
    rev = np.argsort(-np.flip(x, axis), axis=axis, kind="stable")  # ties: lower flipped index
    return (n - 1) - rev


@reference("ArgMax")
def _argmax(layer: Layer, xs: list[np.ndarray]) -> list[np.ndarray]:
    x = xs[0]
    k = int(attr(layer, "top_k", 1))
    omv = bool(attr(layer, "out_max_val", False))
    if "axis" in layer.attrs:
        axis = _axis(int(layer.attrs["axis"]), x.ndim)
        idx = np.take(_caffe_order(x, axis), np.arange(k), axis=axis)
        return [np.take_along_axis(x, idx, axis) if omv else idx.astype(np.float64)]
    flat = x.reshape(x.shape[0], -1)
    idx = _caffe_order(flat, 1)[:, :k]
    vals = np.take_along_axis(flat, idx, 1)
    out = np.stack([idx, vals], 1) if omv else idx[:, None].astype(np.float64)
    while out.ndim < max(x.ndim, 3):
        out = out[..., None]
    return [out]


@reference("Reduction")
def _reduction(layer: Layer, xs: list[np.ndarray]) -> list[np.ndarray]:
    x = xs[0]
    axis = _axis(int(attr(layer, "axis", 0)), x.ndim)
    flat = x.reshape(x.shape[:axis] + (-1,))
    op = str(attr(layer, "operation", "SUM"))
    y = {"SUM": flat.sum(-1), "ASUM": np.abs(flat).sum(-1), "SUMSQ": (flat * flat).sum(-1),
         "MEAN": flat.mean(-1)}[op]
    return [y * float(attr(layer, "coeff", 1.0))]


@reference("Upsample")
def _upsample(layer: Layer, xs: list[np.ndarray]) -> list[np.ndarray]:
    x = xs[0]
    s = int(attr(layer, "scale", 2))
    if len(xs) == 1:
        return [x.repeat(s, 2).repeat(s, 3)]
    n, c, h, w = x.shape
    oh, ow = h * s, w * s
    out = np.zeros((n, c, oh * ow))
    mask = xs[1].reshape(n, c, -1).astype(np.int64)
    for i in range(n):
        for j in range(c):
            out[i, j, mask[i, j]] = x[i, j].reshape(-1)
    return [out.reshape(n, c, oh, ow)]


@reference("Interp")
def _interp(layer: Layer, xs: list[np.ndarray]) -> list[np.ndarray]:
    """Caffe's ``caffe_cpu_interp2`` (DeepLab/PSPNet): float32 ratios, corners aligned."""
    from ..shapes import top_shapes

    x = xs[0]
    out = top_shapes(layer, [tuple(a.shape) for a in xs])[0]
    assert out is not None
    beg, end = int(attr(layer, "pad_beg", 0)), int(attr(layer, "pad_end", 0))
    x = x[:, :, -beg:x.shape[2] + end, -beg:x.shape[3] + end].astype(np.float32)

    def axis(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        r = np.float32((size_in - 1) / (size_out - 1)) if size_out > 1 else np.float32(0)
        src = r * np.arange(size_out, dtype=np.float32)
        i0 = src.astype(np.int64)
        step = (i0 < size_in - 1).astype(np.int64)
        return i0, i0 + step, (src - i0).astype(np.float32)

    h0, h1, lh = axis(x.shape[2], out[2])
    w0, w1, lw = axis(x.shape[3], out[3])
    lh, lw = lh[:, None], lw[None, :]
    top = (1 - lw) * x[:, :, h0][:, :, :, w0] + lw * x[:, :, h0][:, :, :, w1]
    bottom = (1 - lw) * x[:, :, h1][:, :, :, w0] + lw * x[:, :, h1][:, :, :, w1]
    return [(1 - lh) * top + lh * bottom]


@reference("ShuffleChannel")
def _shuffle_channel(layer: Layer, xs: list[np.ndarray]) -> list[np.ndarray]:
    x = xs[0]
    g = int(attr(layer, "group", 1))
    n, c = x.shape[:2]
    out = np.empty_like(x)
    for i in range(g):  # Caffe's loop: top channel j * g + i <- bottom channel i * (c/g) + j
        for j in range(c // g):
            out[:, j * g + i] = x[:, i * (c // g) + j]
    return [out]


@reference("Axpy")
def _axpy(layer: Layer, xs: list[np.ndarray]) -> list[np.ndarray]:
    a, x, y = xs
    return [a * x + y]
