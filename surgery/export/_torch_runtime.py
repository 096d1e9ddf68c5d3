"""Runtime pieces of exported PyTorch models: Caffe semantics PyTorch lacks.

This module imports only ``fnmatch``, ``math``, ``struct`` and ``torch``: its source is copied
verbatim into every generated ``model.py`` so that file needs nothing but torch. Keep it
self-contained (no imports from ``surgery``), and keep every top-level name prefixed ``caffe_``
or ``Caffe``.
"""

# ruff: noqa: B008
from __future__ import annotations

import fnmatch
import math
import struct

import torch
import torch.nn.functional as F
from torch import nn

CAFFE_FLT_MIN = 1.1754943508222875e-38
CAFFE_FLT_LOWEST = -3.4028234663852886e38


# -- pooling ----------------------------------------------------------------------------------
def caffe_pool_out(size: int, k: int, p: int, s: int, ceil: bool, any_pad: bool) -> int:
    """Caffe's pooled size on one axis (ceil rounding, then the clip rule when padded)."""
    span = size + 2 * p - k
    out = (-(-span // s) if ceil else span // s) + 1
    if any_pad and (out - 1) * s >= size + p:
        out -= 1
    return out


def caffe_pool_divisor(size: int, out: int, k: int, p: int, s: int) -> list[float]:
    """AVE divisor per output position on one axis: the window clipped to size + pad."""
    return [float(min(o * s - p + k, size + p) - (o * s - p)) for o in range(out)]


def caffe_pool2d(
    x: torch.Tensor,
    method: str,
    kernel: tuple[int, int] | None,
    stride: tuple[int, int],
    pad: tuple[int, int],
    ceil: bool = True,
    training: bool = False,
) -> torch.Tensor:
    """Caffe's Pooling on (N, C, H, W): MAX, AVE or STOCHASTIC (its TEST rule).

    ``kernel=None`` is global pooling. The fast path calls PyTorch's pooling when its output
    size and divisor equal Caffe's; otherwise the bottom is padded explicitly (the ceil-mode
    overhang included) and AVE divides by Caffe's clipped window.
    """
    h, w = int(x.shape[-2]), int(x.shape[-1])
    if kernel is None:
        kernel, stride, pad = (h, w), (1, 1), (0, 0)
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, pad
    any_pad = bool(ph or pw)
    oh = caffe_pool_out(h, kh, ph, sh, ceil, any_pad)
    ow = caffe_pool_out(w, kw, pw, sw, ceil, any_pad)
    if method == "STOCHASTIC":
        # Caffe's TEST rule: sum(x^2) / sum(x) over the window, no padding.
        eh = (oh - 1) * sh + kh - h
        ew = (ow - 1) * sw + kw - w
        xp = F.pad(x, (0, ew, 0, eh))
        num = F.avg_pool2d(xp * xp, (kh, kw), (sh, sw)) * (kh * kw)
        den = F.avg_pool2d(xp, (kh, kw), (sh, sw)) * (kh * kw) + CAFFE_FLT_MIN
        return num / den
    native = ph <= kh // 2 and pw <= kw // 2
    if native:
        for size, k, p, s, want in ((h, kh, ph, sh, oh), (w, kw, pw, sw, ow)):
            span = size + 2 * p - k
            o = (-(-span // s) if ceil else span // s) + 1
            if ceil and (o - 1) * s >= size + p:
                o -= 1
            native = native and o == want
    if native:
        if method == "MAX":
            return F.max_pool2d(x, (kh, kw), (sh, sw), (ph, pw), ceil_mode=ceil)
        return F.avg_pool2d(x, (kh, kw), (sh, sw), (ph, pw), ceil_mode=ceil,
                            count_include_pad=True)
    eh = (oh - 1) * sh + kh - h - ph
    ew = (ow - 1) * sw + kw - w - pw
    if method == "MAX":
        xp = F.pad(x, (pw, ew, ph, eh), value=CAFFE_FLT_LOWEST)
        return F.max_pool2d(xp, (kh, kw), (sh, sw))
    xp = F.pad(x, (pw, ew, ph, eh))
    total = F.avg_pool2d(xp, (kh, kw), (sh, sw)) * float(kh * kw)
    dh = torch.tensor(caffe_pool_divisor(h, oh, kh, ph, sh), dtype=total.dtype,
                      device=total.device)
    dw = torch.tensor(caffe_pool_divisor(w, ow, kw, pw, sw), dtype=total.dtype,
                      device=total.device)
    return total / (dh[:, None] * dw[None, :])


def caffe_max_pool2d_mask(
    x: torch.Tensor, kernel: tuple[int, int] | None, stride: tuple[int, int],
    pad: tuple[int, int], ceil: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MAX pooling with Caffe's second top: the argmax as a float index into the H*W plane."""
    h, w = int(x.shape[-2]), int(x.shape[-1])
    if kernel is None:
        kernel, stride, pad = (h, w), (1, 1), (0, 0)
    out, idx = F.max_pool2d(x, kernel, stride, pad, ceil_mode=ceil, return_indices=True)
    return out, idx.to(x.dtype)


# -- normalization ----------------------------------------------------------------------------
def caffe_lrn(x: torch.Tensor, size: int, alpha: float, beta: float, k: float,
              within_channel: bool) -> torch.Tensor:
    """Caffe's LRN. ACROSS_CHANNELS: x / (k + alpha/n * sum_n x^2)^beta. WITHIN_CHANNEL:
    x / (1 + alpha * avgpool_nxn(x^2))^beta with pad (n-1)/2 (divisor n*n at stride 1)."""
    if not within_channel:
        return F.local_response_norm(x, size, alpha, beta, k)
    pad = (size - 1) // 2
    sq = F.avg_pool2d(x * x, size, 1, pad, count_include_pad=True)
    return x * torch.pow(1.0 + alpha * sq, -beta)


class CaffeBatchNorm(nn.Module):
    """Caffe's BatchNorm: no affine part; running stats already divided by Caffe's factor.

    ``use_global_stats`` None follows ``self.training`` (Caffe: false in TRAIN, true in TEST);
    True/False pins it as the layer said. Computing batch statistics updates the running ones as
    Caffe does: Caffe keeps *sums* ``S = maf * S + batch`` and a factor ``F = maf * F + 1``
    (float32, ``maf = moving_average_fraction``) and uses ``S / F``. With ``momentum = 1 / F``
    (after the factor's update) PyTorch's ``(1 - m) * running + m * batch`` is exactly ``S / F``:
    a net trained from scratch (factor 0) takes its first batch's statistics at once, as Caffe,
    instead of creeping from (0, 1). ``factor`` is Caffe's blob 2 (``caffe_factor``, written
    back by ``to_caffemodel``).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.001,
                 use_global_stats: bool | None = None, factor: float = 0.0) -> None:
        super().__init__()
        self.eps = eps
        self.momentum = momentum
        self.use_global_stats = use_global_stats
        self.caffe_factor = float(factor)
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ugs = (not self.training) if self.use_global_stats is None else self.use_global_stats
        momentum = self.momentum
        if not ugs:
            maf = caffe_float32(1.0 - self.momentum)
            self.caffe_factor = caffe_float32(caffe_float32(self.caffe_factor * maf) + 1.0)
            momentum = 1.0 / self.caffe_factor
        return F.batch_norm(x, self.running_mean, self.running_var, None, None,
                            training=not ugs, momentum=momentum, eps=self.eps)

    def extra_repr(self) -> str:
        return (f"{self.running_mean.numel()}, eps={self.eps}, momentum={self.momentum}, "
                f"use_global_stats={self.use_global_stats}, factor={self.caffe_factor}")


def caffe_float32(x: float) -> float:
    """``x`` rounded to float32, as Caffe's ``Dtype`` arithmetic keeps it."""
    return struct.unpack("f", struct.pack("f", x))[0]


class CaffeBN(nn.Module):
    """The forks' BN layer: normalisation with its own per-channel scale and shift.

    ``mode``: ``"pspnet"`` (hszhao/PSPNet: stored statistics when ``frozen`` or in eval, else
    this batch's mean and biased variance, the stored ones updated as
    ``momentum * stored + (1 - momentum) * batch``), ``"learn"`` (SegNet LEARN: this batch's
    statistics in both modes, ``var = E(x^2) - E(x)^2``) or ``"inference"`` (SegNet
    INFERENCE: ``x * weight + bias``). Then ``(x - mean) * (var + eps)^-0.5 * weight + bias``.
    """

    def __init__(self, num_features: int, mode: str, eps: float = 1e-5, momentum: float = 0.9,
                 frozen: bool = False) -> None:
        super().__init__()
        self.mode = mode
        self.eps = eps
        self.momentum = momentum
        self.frozen = frozen
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        if mode == "pspnet":
            self.register_buffer("running_mean", torch.zeros(num_features))
            self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        w, b = self.weight.reshape(shape), self.bias.reshape(shape)
        if self.mode == "inference":
            return x * w + b
        if self.mode == "pspnet" and (self.frozen or not self.training):
            mean, var = self.running_mean.reshape(shape), self.running_var.reshape(shape)
        else:
            axes = [0] + list(range(2, x.dim()))
            mean = x.mean(axes, keepdim=True)
            if self.mode == "learn":
                var = (x * x).mean(axes, keepdim=True) - mean * mean
            else:
                var = ((x - mean) ** 2).mean(axes, keepdim=True)
                if self.training:
                    with torch.no_grad():
                        m = self.momentum
                        self.running_mean.mul_(m).add_((1 - m) * mean.detach().reshape(-1))
                        self.running_var.mul_(m).add_((1 - m) * var.detach().reshape(-1))
        return (x - mean) * torch.pow(var + self.eps, -0.5) * w + b

    def extra_repr(self) -> str:
        return (f"{self.weight.numel()}, mode={self.mode!r}, eps={self.eps}, "
                f"momentum={self.momentum}, frozen={self.frozen}")


def caffe_broadcast(t: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    """View a Scale/Bias factor covering axes axis..axis+t.dim()-1 of an ndim-axis blob."""
    return t.reshape((1,) * axis + tuple(t.shape) + (1,) * (ndim - axis - t.dim()))


class CaffeScale(nn.Module):
    """Caffe's Scale with a learned factor (and optional bias) over ``axis``..."""

    def __init__(self, shape: tuple[int, ...], axis: int, bias: bool) -> None:
        super().__init__()
        self.axis = axis
        self.weight = nn.Parameter(torch.ones(shape))
        self.bias = nn.Parameter(torch.zeros(shape)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * caffe_broadcast(self.weight, x.dim(), self.axis)
        if self.bias is not None:
            y = y + caffe_broadcast(self.bias, x.dim(), self.axis)
        return y


class CaffeScale2(nn.Module):
    """Caffe's Scale with the factor as a second bottom (optional learned bias)."""

    def __init__(self, shape: tuple[int, ...], axis: int, bias: bool) -> None:
        super().__init__()
        self.axis = axis
        self.bias = nn.Parameter(torch.zeros(shape)) if bias else None

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        y = x * caffe_broadcast(s, x.dim(), self.axis)
        if self.bias is not None:
            y = y + caffe_broadcast(self.bias, x.dim(), self.axis)
        return y


class CaffeBias(nn.Module):
    """Caffe's Bias with a learned blob."""

    def __init__(self, shape: tuple[int, ...], axis: int) -> None:
        super().__init__()
        self.axis = axis
        self.bias = nn.Parameter(torch.zeros(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + caffe_broadcast(self.bias, x.dim(), self.axis)


def caffe_bias2(x: torch.Tensor, b: torch.Tensor, axis: int) -> torch.Tensor:
    """Caffe's Bias with the bias as a second bottom."""
    return x + caffe_broadcast(b, x.dim(), axis)


class CaffeNormalize(nn.Module):
    """SSD's Normalize: x / sqrt(sum x^2 + eps) (over C,H,W or over C), times a scale."""

    def __init__(self, channels: int, across_spatial: bool, eps: float) -> None:
        super().__init__()
        self.across_spatial = across_spatial
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.across_spatial:
            dims = tuple(range(1, x.dim()))
        else:
            dims = (1,)
        norm = torch.sqrt(torch.sum(x * x, dim=dims, keepdim=True) + self.eps)
        return x / norm * caffe_broadcast(self.weight, x.dim(), 1)


class CaffeInnerProduct(nn.Module):
    """InnerProduct with ``transpose: true``: the weight kept in Caffe's (K, N) layout."""

    def __init__(self, k: int, n: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(k, n))
        self.bias = nn.Parameter(torch.zeros(n)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight
        return y + self.bias if self.bias is not None else y


# -- elementwise and shape functions ----------------------------------------------------------
def caffe_eltwise_sum(xs: list[torch.Tensor], coeffs: list[float]) -> torch.Tensor:
    """Eltwise SUM with coefficients, accumulated in bottom order as Caffe does."""
    y = xs[0] if coeffs[0] == 1.0 else xs[0] * coeffs[0]
    for x, c in zip(xs[1:], coeffs[1:], strict=True):
        y = y + x if c == 1.0 else y + x * c
    return y


def caffe_eltwise_prod(xs: list[torch.Tensor]) -> torch.Tensor:
    y = xs[0]
    for x in xs[1:]:
        y = y * x
    return y


def caffe_eltwise_max(xs: list[torch.Tensor]) -> torch.Tensor:
    y = xs[0]
    for x in xs[1:]:
        y = torch.maximum(y, x)
    return y


def caffe_power(x: torch.Tensor, power: float, scale: float, shift: float) -> torch.Tensor:
    """Caffe's Power: (shift + scale * x) ^ power."""
    y = x
    if scale != 1.0:
        y = y * scale
    if shift != 0.0:
        y = y + shift
    if power != 1.0:
        y = torch.pow(y, power)
    return y


def caffe_exp(x: torch.Tensor, base: float, scale: float, shift: float) -> torch.Tensor:
    """Caffe's Exp: base ^ (shift + scale * x); base -1 means e."""
    ln = 1.0 if base == -1.0 else math.log(base)
    return torch.exp(x * (ln * scale) + ln * shift)


def caffe_log(x: torch.Tensor, base: float, scale: float, shift: float) -> torch.Tensor:
    """Caffe's Log: log_base(shift + scale * x); base -1 means e."""
    y = x * scale + shift if (scale != 1.0 or shift != 0.0) else x
    y = torch.log(y)
    return y if base == -1.0 else y * (1.0 / math.log(base))


def caffe_bnll(x: torch.Tensor) -> torch.Tensor:
    """Caffe's BNLL: ``x > 0 ? x + log(1 + exp(-x)) : log(1 + exp(x))``. Each branch sees an
    argument clamped to its own side, so the branch not taken cannot overflow (that would
    make the gradient NaN for large ``|x|``); the gradient is ``sigmoid(x)``, 0.5 at 0."""
    pos = x + torch.log1p(torch.exp(-torch.clamp(x, min=0)))
    neg = torch.log1p(torch.exp(torch.clamp(x, max=0)))
    return torch.where(x > 0, pos, neg)


def caffe_threshold(x: torch.Tensor, threshold: float) -> torch.Tensor:
    return (x > threshold).to(x.dtype)


def caffe_swish(x: torch.Tensor, beta: float) -> torch.Tensor:
    return x * torch.sigmoid(x * beta) if beta != 1.0 else x * torch.sigmoid(x)


def caffe_reshape(x: torch.Tensor, dims: tuple[int, ...], axis: int, num_axes: int) -> torch.Tensor:
    """Caffe's Reshape: ``0`` copies the bottom's axis, ``-1`` infers one axis."""
    shape = list(x.shape)
    start = axis if axis >= 0 else len(shape) + axis + 1
    end = len(shape) if num_axes == -1 else start + num_axes
    new = [shape[start + i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(shape[:start] + new + shape[end:])


def caffe_crop(x: torch.Tensor, ref: torch.Tensor, axis: int, offsets: list[int]) -> torch.Tensor:
    """Caffe's Crop: every axis from ``axis`` on cut to ``ref``'s size at ``offsets``."""
    index = [slice(None)] * x.dim()
    for i in range(axis, x.dim()):
        off = offsets[i - axis]
        index[i] = slice(off, off + int(ref.shape[i]))
    return x[tuple(index)]


def caffe_slice(x: torch.Tensor, axis: int, sizes: list[int]) -> tuple[torch.Tensor, ...]:
    return torch.split(x, sizes, dim=axis)


def caffe_tile(x: torch.Tensor, axis: int, tiles: int) -> torch.Tensor:
    reps = [1] * x.dim()
    reps[axis] = tiles
    return x.repeat(reps)


def caffe_topk(x: torch.Tensor, k: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest along ``dim`` in Caffe's order: ``(value, index)`` pairs sorted
    descending, so among equal values the higher index comes first (``torch.topk`` does not
    say which)."""
    n = int(x.shape[dim])
    vals, rev = torch.sort(x.flip(dim), dim=dim, descending=True, stable=True)
    return vals.narrow(dim, 0, k), (n - 1) - rev.narrow(dim, 0, k)


def caffe_argmax(x: torch.Tensor, top_k: int, out_max_val: bool, axis: int | None) -> torch.Tensor:
    """Caffe's ArgMax (indices as floats; with ``out_max_val`` and no axis: [index; value])."""
    if axis is not None:
        vals, idx = caffe_topk(x, top_k, axis)
        return vals if out_max_val else idx.to(x.dtype)
    flat = x.reshape(x.shape[0], -1)
    vals, idx = caffe_topk(flat, top_k, 1)
    out = torch.stack([idx.to(x.dtype), vals], 1) if out_max_val else idx.to(x.dtype)[:, None]
    while out.dim() < max(x.dim(), 3):
        out = out.unsqueeze(-1)
    return out


def caffe_reduction(x: torch.Tensor, op: str, axis: int, coeff: float) -> torch.Tensor:
    """Caffe's Reduction over every axis from ``axis`` on (SUM, ASUM, SUMSQ, MEAN)."""
    y = x.reshape(tuple(x.shape[:axis]) + (-1,))
    if op == "ASUM":
        y = y.abs().sum(-1)
    elif op == "SUMSQ":
        y = (y * y).sum(-1)
    elif op == "MEAN":
        y = y.mean(-1)
    else:
        y = y.sum(-1)
    return y * coeff if coeff != 1.0 else y


def caffe_mvn(x: torch.Tensor, normalize_variance: bool, across_channels: bool,
              eps: float) -> torch.Tensor:
    """Caffe's MVN: subtract the mean (per channel or per item); divide by std + eps."""
    dims = tuple(range(1, x.dim())) if across_channels else tuple(range(2, x.dim()))
    y = x - x.mean(dim=dims, keepdim=True)
    if normalize_variance:
        var = (y * y).mean(dim=dims, keepdim=True)
        y = y / (torch.sqrt(var) + eps)
    return y


def caffe_upsample_nearest(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="nearest")


def caffe_interp(x: torch.Tensor, size: tuple[int, int], pad_beg: int, pad_end: int
                 ) -> torch.Tensor:
    """DeepLab/PSPNet Interp: crop by the (non-positive) pads, then bilinear resize with the
    corners aligned (``rheight = (H_in - 1) / (H_out - 1)``)."""
    if pad_beg or pad_end:
        h, w = x.shape[2], x.shape[3]
        x = x[:, :, -pad_beg:h + pad_end, -pad_beg:w + pad_end]
    if (x.shape[2], x.shape[3]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def caffe_axpy(a: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """SENet's Axpy: ``a * x + y`` with ``a`` of shape (N, C, 1, 1)."""
    return a * x + y


def caffe_shuffle_channel(x: torch.Tensor, group: int) -> torch.Tensor:
    """ShuffleNet's ShuffleChannel: channels as a (group, C/group) matrix, transposed."""
    n, c = x.shape[0], x.shape[1]
    return x.reshape(n, group, c // group, -1).transpose(1, 2).reshape(x.shape)


def caffe_unpool(x: torch.Tensor, mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """SegNet Upsample: scatter each value to its Pooling mask position in an (oh, ow) plane."""
    n, c, h, w = x.shape
    out = x.new_zeros(n, c, size[0] * size[1])
    out.scatter_(2, mask.reshape(n, c, h * w).long(), x.reshape(n, c, h * w))
    return out.reshape(n, c, size[0], size[1])


# -- losses -----------------------------------------------------------------------------------
def caffe_normalizer(mode: str, outer: int, inner: int,
                     valid: torch.Tensor | int) -> torch.Tensor | float:
    if mode == "FULL":
        return float(outer * inner)
    if mode == "VALID":
        return valid
    if mode == "BATCH_SIZE":
        return float(outer)
    return 1.0


def caffe_softmax_loss(x: torch.Tensor, label: torch.Tensor, axis: int,
                       ignore_label: int | None, normalization: str) -> torch.Tensor:
    """SoftmaxWithLoss: -log(max(softmax, FLT_MIN)) at the label, normalized as Caffe."""
    logp = torch.log_softmax(x, dim=axis).clamp(min=math.log(CAFFE_FLT_MIN))
    outer = int(math.prod(x.shape[:axis]))
    inner = int(math.prod(x.shape[axis + 1:]))
    lab = label.reshape(outer, inner).long()
    logp = logp.reshape(outer, x.shape[axis], inner)
    keep = torch.ones_like(lab, dtype=torch.bool) if ignore_label is None else lab != ignore_label
    safe = torch.where(keep, lab, torch.zeros_like(lab))
    picked = torch.gather(logp, 1, safe[:, None, :])[:, 0, :]
    loss = -(picked * keep.to(picked.dtype)).sum()
    valid = keep.sum().to(loss.dtype) if normalization == "VALID" else 0
    norm = caffe_normalizer(normalization, outer, inner, valid)
    if isinstance(norm, torch.Tensor):
        norm = torch.clamp(norm, min=1.0)
    return loss / norm


def caffe_euclidean_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    d = a.reshape(a.shape[0], -1) - b.reshape(b.shape[0], -1).to(a.dtype)
    return (d * d).sum() / a.shape[0] / 2.0


def caffe_sigmoid_ce_loss(x: torch.Tensor, target: torch.Tensor, ignore_label: int | None,
                          normalization: str) -> torch.Tensor:
    t = target.reshape(x.shape).to(x.dtype)
    per = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    keep = torch.ones_like(per, dtype=torch.bool) if ignore_label is None else t != ignore_label
    loss = (per * keep.to(per.dtype)).sum()
    valid = keep.sum().to(loss.dtype) if normalization == "VALID" else 0
    norm = caffe_normalizer(normalization, int(x.shape[0]), int(x[0].numel()), valid)
    if isinstance(norm, torch.Tensor):
        norm = torch.clamp(norm, min=1.0)
    return loss / norm


def caffe_accuracy(x: torch.Tensor, label: torch.Tensor, top_k: int, axis: int,
                   ignore_label: int | None) -> torch.Tensor:
    """Caffe's Accuracy: a sample is right when at most ``top_k`` scores are >= the true
    class's score (ties count against it), over the samples whose label is not ignored."""
    with torch.no_grad():
        outer = int(math.prod(x.shape[:axis]))
        inner = int(math.prod(x.shape[axis + 1:]))
        scores = x.reshape(outer, x.shape[axis], inner)
        lab = label.reshape(outer, inner).long()
        keep = torch.ones_like(lab, dtype=torch.bool) if ignore_label is None \
            else lab != ignore_label
        safe = torch.where(keep, lab, torch.zeros_like(lab))
        true = torch.gather(scores, 1, safe[:, None, :])
        better = (scores >= true).sum(dim=1)
        right = ((better <= top_k) & keep).sum().to(x.dtype)
        count = keep.sum().to(x.dtype)
        return torch.where(count > 0, right / count.clamp(min=1), torch.zeros_like(count))


def caffe_weighted_sum(losses: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    total = losses[0] * weights[0]
    for x, w in zip(losses[1:], weights[1:], strict=True):
        total = total + x * w
    return total


# -- SSD DetectionOutput ----------------------------------------------------------------------
# Written from the SSD fork's detection_output_layer.cpp (Forward_cpu) and bbox_util.cpp:
# float32 throughout, each formula in Caffe's operation order.
CAFFE_CODE_TYPES = {1: "CORNER", 2: "CENTER_SIZE", 3: "CORNER_SIZE"}


def caffe_decode_bboxes(loc: torch.Tensor, prior: torch.Tensor, variance: torch.Tensor | None,
                        code_type: str = "CORNER",
                        variance_encoded_in_target: bool = False) -> torch.Tensor:
    """Caffe's DecodeBBox: offsets ``loc`` (..., 4) against priors (..., 4) [xmin, ymin, xmax,
    ymax] with ``variance`` (..., 4) (unused when the variance is encoded in the target).

    CORNER adds the (variance-scaled) offsets to the corners; CENTER_SIZE moves the center by
    ``v * d * prior_size`` and scales the size by ``exp(v * d)``; CORNER_SIZE adds
    ``v * d * prior_size`` to the corners. Not clipped (DetectionOutput never clips).
    """
    code_type = CAFFE_CODE_TYPES.get(code_type, code_type) if isinstance(code_type, int) \
        else str(code_type)
    px1, py1, px2, py2 = prior.unbind(-1)
    d0, d1, d2, d3 = loc.unbind(-1)
    if not variance_encoded_in_target:
        if variance is None:
            raise ValueError("DetectionOutput: the priors carry no variances")
        v0, v1, v2, v3 = variance.unbind(-1)
        d0, d1, d2, d3 = v0 * d0, v1 * d1, v2 * d2, v3 * d3  # Caffe: (v * d) * size
    if code_type == "CORNER":
        x1, y1, x2, y2 = px1 + d0, py1 + d1, px2 + d2, py2 + d3
    elif code_type == "CENTER_SIZE":
        pw = px2 - px1
        ph = py2 - py1
        pcx = (px1 + px2) / 2.0
        pcy = (py1 + py2) / 2.0
        cx = d0 * pw + pcx
        cy = d1 * ph + pcy
        w = torch.exp(d2) * pw
        h = torch.exp(d3) * ph
        x1, y1, x2, y2 = cx - w / 2.0, cy - h / 2.0, cx + w / 2.0, cy + h / 2.0
    elif code_type == "CORNER_SIZE":
        pw = px2 - px1
        ph = py2 - py1
        x1, y1, x2, y2 = px1 + d0 * pw, py1 + d1 * ph, px2 + d2 * pw, py2 + d3 * ph
    else:
        raise ValueError(f"DetectionOutput: unknown code_type {code_type!r}")
    return torch.stack([x1, y1, x2, y2], -1)


def caffe_bbox_size(boxes: torch.Tensor, normalized: bool = True) -> torch.Tensor:
    """Caffe's BBoxSize: 0 for an invalid box (xmax < xmin or ymax < ymin), else w * h
    ((w + 1) * (h + 1) when not normalized)."""
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    size = w * h if normalized else (w + 1.0) * (h + 1.0)
    invalid = (boxes[..., 2] < boxes[..., 0]) | (boxes[..., 3] < boxes[..., 1])
    return torch.where(invalid, torch.zeros_like(size), size)


def caffe_jaccard_overlap(a: torch.Tensor, b: torch.Tensor, normalized: bool = True,
                          size_a: torch.Tensor | None = None,
                          size_b: torch.Tensor | None = None) -> torch.Tensor:
    """Caffe's JaccardOverlap(NormalizedBBox) between broadcastable box tensors (..., 4).

    Disjoint boxes intersect in [0, 0, 0, 0] (IntersectBBox); ``normalized=False`` adds 1 to
    the intersection's width and height (so disjoint boxes overlap by 1 pixel, as in Caffe)
    while the box areas stay BBoxSize's normalized ones (Caffe calls it with the default).
    Returns 0 unless the intersection has positive width and height.
    """
    disjoint = ((b[..., 0] > a[..., 2]) | (b[..., 2] < a[..., 0])
                | (b[..., 1] > a[..., 3]) | (b[..., 3] < a[..., 1]))
    zero = torch.zeros((), dtype=a.dtype, device=a.device)
    ix1 = torch.where(disjoint, zero, torch.maximum(a[..., 0], b[..., 0]))
    iy1 = torch.where(disjoint, zero, torch.maximum(a[..., 1], b[..., 1]))
    ix2 = torch.where(disjoint, zero, torch.minimum(a[..., 2], b[..., 2]))
    iy2 = torch.where(disjoint, zero, torch.minimum(a[..., 3], b[..., 3]))
    iw = ix2 - ix1
    ih = iy2 - iy1
    if not normalized:
        iw = iw + 1.0
        ih = ih + 1.0
    inter = iw * ih
    sa = caffe_bbox_size(a) if size_a is None else size_a
    sb = caffe_bbox_size(b) if size_b is None else size_b
    ov = inter / (sa + sb - inter)
    return torch.where((iw > 0) & (ih > 0), ov, zero)


def caffe_f32(x: float) -> float:
    """``x`` rounded to float32 (Caffe's ``float`` arithmetic on scalars)."""
    return float(torch.tensor(x, dtype=torch.float32))


def caffe_nms_fast(boxes: torch.Tensor, scores: torch.Tensor, score_threshold: float,
                   nms_threshold: float, eta: float = 1.0, top_k: int = -1,
                   normalized: bool = True) -> torch.Tensor:
    """Caffe's ApplyNMSFast: the indices kept, in keep order (score descending).

    Candidates: scores ``> score_threshold``, stable-sorted by score descending (ties keep the
    prior order, as ``std::stable_sort``), the first ``top_k`` when ``top_k > -1``. Greedy: a
    candidate is kept when its overlap with every box kept so far is ``<= threshold``; after
    each keep, while ``eta < 1`` and the threshold is above 0.5, the threshold is multiplied
    by ``eta`` (adaptive NMS). Between two keeps the threshold is constant, so each step jumps
    to the next candidate not suppressed by the maximum overlap with the kept boxes.
    """
    cand = torch.nonzero(scores > score_threshold).flatten()
    if cand.numel() == 0:
        return cand
    order = torch.sort(scores[cand], descending=True, stable=True)[1]
    cand = cand[order]
    if top_k > -1:
        cand = cand[:top_k]
    bb = boxes[cand]
    sizes = caffe_bbox_size(bb)
    k = int(cand.numel())
    max_overlap = torch.zeros(k, dtype=bb.dtype, device=bb.device)
    threshold = caffe_f32(nms_threshold)
    eta32 = caffe_f32(eta)
    kept: list[int] = []
    pos = 0
    while pos < k:
        free = torch.nonzero(max_overlap[pos:] <= threshold)
        if free.numel() == 0:
            break
        j = pos + int(free[0, 0])
        kept.append(j)
        ov = caffe_jaccard_overlap(bb[j], bb, normalized, sizes[j], sizes)
        max_overlap = torch.maximum(max_overlap, ov)
        if eta32 < 1.0 and threshold > 0.5:
            threshold = caffe_f32(threshold * eta32)
        pos = j + 1
    return cand[torch.tensor(kept, dtype=torch.long, device=cand.device)]


def caffe_detection_output(
    loc: torch.Tensor, conf: torch.Tensor, prior: torch.Tensor, num_classes: int,
    share_location: bool = True, background_label_id: int = 0, code_type: str = "CORNER",
    variance_encoded_in_target: bool = False, keep_top_k: int = -1,
    confidence_threshold: float = -math.inf, nms_threshold: float = 0.3, top_k: int = -1,
    eta: float = 1.0,
) -> torch.Tensor:
    """SSD's DetectionOutput (Caffe's Forward_cpu): decode, per-class NMS, keep_top_k.

    ``loc`` (N, P*L*4) with L = 1 (share_location) or num_classes, ``conf`` (N, P*C) of
    probabilities, ``prior`` (1, 2, P*4): boxes then variances. Returns (1, 1, R, 7) float32
    rows ``[image_id, label, score, xmin, ymin, xmax, ymax]``: per image, labels ascending,
    within a label by score descending. When no image has a detection, R = N rows
    ``[i, -1, -1, -1, -1, -1, -1]``. ``keep_top_k`` keeps the best-scored rows of an image
    across classes (a stable sort: among equal scores the lower label, then the earlier row,
    wins; Caffe's ``std::sort`` leaves that order unspecified).
    """
    num = int(loc.shape[0])
    dev = loc.device
    loc = loc.float().reshape(num, -1)
    conf = conf.float().reshape(num, -1)
    num_priors = int(prior.shape[2] if prior.dim() >= 3 else prior.shape[-1]) // 4
    flat = prior.float().reshape(-1).to(dev)
    pbox = flat[:num_priors * 4].reshape(num_priors, 4)
    pvar = (flat[num_priors * 4:num_priors * 8].reshape(num_priors, 4)
            if flat.numel() >= num_priors * 8 else None)
    num_loc = 1 if share_location else num_classes
    if loc.shape[1] != num_priors * num_loc * 4 or conf.shape[1] != num_priors * num_classes:
        raise ValueError(f"DetectionOutput: {num_priors} priors do not match loc "
                         f"{tuple(loc.shape)} / conf {tuple(conf.shape)}")
    decoded = caffe_decode_bboxes(
        loc.reshape(num, num_priors, num_loc, 4), pbox[:, None, :],
        None if pvar is None else pvar[:, None, :], code_type, variance_encoded_in_target)
    scores = conf.reshape(num, num_priors, num_classes)
    rows: list[torch.Tensor] = []
    for i in range(num):
        labels: list[torch.Tensor] = []
        indices: list[torch.Tensor] = []
        for c in range(num_classes):
            if c == background_label_id:
                continue
            keep = caffe_nms_fast(decoded[i, :, 0 if share_location else c], scores[i, :, c],
                                  confidence_threshold, nms_threshold, eta, top_k)
            labels.append(torch.full_like(keep, c))
            indices.append(keep)
        if not indices:
            continue
        lab = torch.cat(labels)
        idx = torch.cat(indices)
        sc = scores[i, idx, lab]
        if -1 < keep_top_k < int(idx.numel()):
            best = torch.sort(sc, descending=True, stable=True)[1][:keep_top_k]
            best = best[torch.sort(lab[best], stable=True)[1]]  # Caffe's map: by label
            lab, idx, sc = lab[best], idx[best], sc[best]
        box = decoded[i, idx, 0] if share_location else decoded[i, idx, lab]
        ids = torch.full_like(sc, float(i))
        rows.append(torch.cat([ids[:, None], lab.to(sc.dtype)[:, None], sc[:, None], box], 1))
    out = torch.cat(rows) if rows else loc.new_zeros((0, 7))
    if out.shape[0] == 0:
        out = torch.full((num, 7), -1.0, dtype=torch.float32, device=dev)
        out[:, 0] = torch.arange(num, dtype=torch.float32, device=dev)
    return out.reshape(1, 1, -1, 7)


# -- fine-tuning helpers (also in every model.py) ---------------------------------------------
def caffe_tables(model: nn.Module) -> tuple[nn.Module, dict, dict]:
    """``(inner module, lr table, names table)`` of an exported model.

    Unwraps ``torch.compile`` (``_orig_mod``) and DataParallel/DDP (``module``). The lr table
    maps a parameter name to ``(lr_mult, decay_mult)`` (the instance's ``caffe_lr``, else the
    class's ``CAFFE_LR``); the names table maps a parameter/buffer name to ``{"layer", "blob"}``.
    """
    inner = model
    for _ in range(4):
        if "_orig_mod" in inner._modules:  # torch.compile (it forwards attribute reads)
            inner = inner._modules["_orig_mod"]
        elif type(inner).__name__ in ("DistributedDataParallel", "DataParallel"):
            inner = inner.module
        else:
            break
    lr = getattr(inner, "caffe_lr", None)
    if lr is None:
        lr = getattr(type(inner), "CAFFE_LR", {})
    names = getattr(inner, "caffe_names", None)
    if names is None:
        names = getattr(type(inner), "CAFFE_NAMES", {})
    return inner, lr, names


def caffe_param_groups(model: nn.Module, base_lr: float, weight_decay: float = 0.0,
                       unfrozen: tuple[float, float] = (1.0, 1.0)) -> list[dict]:
    """Optimizer groups with Caffe's multipliers, following the *current* ``requires_grad``.

    A parameter with ``requires_grad=False`` is left out. A trainable parameter takes its
    ``(lr_mult, decay_mult)`` from the lr table; one whose table entry has lr_mult 0 (frozen in
    Caffe, made trainable in torch since) takes ``unfrozen`` (Caffe's defaults 1, 1, as
    ``surgery unfreeze`` writes). One group per pair: ``lr = base_lr * lr_mult``,
    ``weight_decay = weight_decay * decay_mult``, plus ``lr_mult``, ``decay_mult``, ``names``.
    """
    inner, lr, _ = caffe_tables(model)
    groups: dict = {}
    for name, p in inner.named_parameters():
        if not p.requires_grad:
            continue
        lm, dm = lr.get(name, (1.0, 1.0))
        if lm == 0.0:
            lm, dm = unfrozen
        g = groups.setdefault((lm, dm), {"params": [], "names": [], "lr": base_lr * lm,
                                         "weight_decay": weight_decay * dm, "lr_mult": lm,
                                         "decay_mult": dm})
        g["params"].append(p)
        g["names"].append(name)
    return list(groups.values())


def caffe_layer_of(names: dict, key: str) -> str:
    """The Caffe layer of a parameter/buffer name (its module's name when not recorded)."""
    entry = names.get(key)
    if entry and entry.get("layer") is not None:
        return str(entry["layer"])
    return key.rsplit(".", 1)[0]


def caffe_match(layer: str, module: str, patterns) -> bool:
    """True when a glob matches the Caffe layer name or the module's (sanitized) name."""
    if isinstance(patterns, str):
        patterns = [patterns]
    return any(fnmatch.fnmatchcase(layer, p) or fnmatch.fnmatchcase(module, p) for p in patterns)


def caffe_per_blob(value, blob: int) -> float:
    """``W`` for every blob, or ``(W, B)``: blob 0 gets W, the others B."""
    if isinstance(value, (int, float)):
        return float(value)
    vals = [float(v) for v in value]
    return vals[0] if blob == 0 or len(vals) == 1 else vals[min(blob, len(vals) - 1)]


def caffe_set_trainable(model: nn.Module, layers=None, trainable: bool = True, lr_mult=None,
                        decay_mult=None, except_=None) -> list[str]:
    """Make the parameters of some layers trainable (or frozen), with their multipliers.

    ``layers``/``except_``: globs over Caffe layer names (or module names); None: every layer.
    ``trainable=True`` sets ``requires_grad`` and the lr table: ``lr_mult``/``decay_mult`` (W
    or (W, B)) when given; otherwise a blob frozen in Caffe (lr_mult 0) gets 1/1 and a blob
    already learning keeps its values. ``trainable=False`` clears ``requires_grad`` and keeps
    the table (so a later ``trainable=True`` restores the Caffe multipliers). Every glob must
    match a layer (ValueError). Returns the parameter names changed, in module order.
    """
    inner, lr, names = caffe_tables(model)
    if not trainable and (lr_mult is not None or decay_mult is not None):
        raise ValueError("lr_mult/decay_mult only with trainable=True")
    for what, v in (("lr_mult", lr_mult), ("decay_mult", decay_mult)):
        if v is None:
            continue
        vals = [v] if isinstance(v, (int, float)) else list(v)
        if not vals or any(float(x) < 0 for x in vals):
            raise ValueError(f"{what} must be non-negative (W or W,B); got {v!r}")
        if what == "lr_mult" and any(float(x) == 0 for x in vals):
            raise ValueError("lr_mult 0 freezes: use trainable=False")
    if getattr(inner, "caffe_lr", None) is not lr:  # a class table: copy before writing
        lr = dict(lr)
        inner.caffe_lr = lr
    entries = list(inner.named_parameters(remove_duplicate=False))
    for what, pats in (("layers", layers), ("except_", except_)):
        if pats is None:
            continue
        for pat in [pats] if isinstance(pats, str) else pats:
            if not any(caffe_match(caffe_layer_of(names, k), k.rsplit(".", 1)[0], pat)
                       for k, _ in entries):
                raise ValueError(f"{what}: {pat!r} matches no layer with parameters")
    aliases: dict = {}
    for key, p in entries:
        aliases.setdefault(id(p), []).append(key)
    done: list[str] = []
    seen: set = set()
    for key, p in entries:
        module = key.rsplit(".", 1)[0]
        layer = caffe_layer_of(names, key)
        if layers is not None and not caffe_match(layer, module, layers):
            continue
        if except_ is not None and caffe_match(layer, module, except_):
            continue
        if id(p) in seen:
            continue
        seen.add(id(p))
        p.requires_grad_(trainable)
        if trainable:
            entry = names.get(key) or {}
            blob = entry.get("blob")
            if blob is None:
                blob = 0 if key.endswith(".weight") else 1
            lm, dm = lr.get(key, (1.0, 1.0))
            was_frozen = lm == 0.0
            lm = caffe_per_blob(lr_mult, blob) if lr_mult is not None else (1.0 if was_frozen
                                                                             else lm)
            dm = (caffe_per_blob(decay_mult, blob) if decay_mult is not None
                  else (1.0 if was_frozen else dm))
            for k in aliases[id(p)]:
                lr[k] = (lm, dm)
        done.append(key)
    return done


def caffe_freeze_bn(model: nn.Module, layers=None, fixed: bool = True) -> list[str]:
    """Keep BatchNorm statistics fixed (``use_global_stats: true``) under ``model.train()``.

    Applies to Caffe ``BatchNorm`` modules (and the PSPNet fork's ``BN``, through its
    ``frozen`` flag) whose Caffe layer (or module) name matches a glob of ``layers`` (None:
    all). ``fixed=False`` returns them to Caffe's default: the batch's statistics in TRAIN,
    the stored ones in TEST. Every glob must match such a layer (ValueError). Returns the Caffe
    layer names changed.
    """
    inner, _, names = caffe_tables(model)
    found = []
    for mname, m in inner.named_modules():
        kind = type(m).__name__
        if kind == "CaffeBatchNorm" or (kind == "CaffeBN" and getattr(m, "mode", "") == "pspnet"):
            found.append((caffe_layer_of(names, f"{mname}.running_mean"), mname, m))
    if layers is not None:
        for pat in [layers] if isinstance(layers, str) else layers:
            if not any(caffe_match(lay, mname, pat) for lay, mname, _ in found):
                raise ValueError(f"layers: {pat!r} matches no BatchNorm layer")
    done = []
    for lay, mname, m in found:
        if layers is not None and not caffe_match(lay, mname, layers):
            continue
        if type(m).__name__ == "CaffeBatchNorm":
            m.use_global_stats = True if fixed else None
        else:
            m.frozen = bool(fixed)
        done.append(lay)
    return done
