"""Caffe's input preprocessing in torch, for generated ``model.py`` files.

Imports only ``torch``: its source is copied verbatim into ``model.py`` (after the runtime) when
the export carries a :class:`surgery.export.preprocess.PreprocessSpec`. Keep every top-level
name prefixed ``caffe_``.
"""

from __future__ import annotations

import torch

CAFFE_LAYOUTS = ("HWC", "CHW", "NHWC", "NCHW")


def caffe_layout(shape: tuple[int, ...], channels: int) -> str:
    """How a batch's axes are laid out: 3-D is one HWC image; 4-D is NHWC when only the last
    axis has ``channels`` entries, NCHW when only axis 1 has; anything else must be named."""
    if len(shape) == 3:
        return "HWC"
    if len(shape) == 4:
        last, second = shape[3] == channels, shape[1] == channels
        if last and not second:
            return "NHWC"
        if second and not last:
            return "NCHW"
        raise ValueError(
            f"images of shape {tuple(shape)}: cannot tell NHWC from NCHW for {channels} "
            "channel(s); pass layout='NHWC' or layout='NCHW'")
    raise ValueError(f"images of shape {tuple(shape)}: expected HWC (one image), NHWC or NCHW")


def caffe_preprocess(images, spec: dict, mean, layout=None, pixel_range=None) -> torch.Tensor:
    """RGB images -> the net input Caffe's data layer makes (see ``spec["steps"]``).

    Args:
        images: a tensor or array: uint8 0-255 or float 0-1 (``pixel_range`` overrides),
            one HWC image, or an NHWC or NCHW batch (``layout`` overrides the guess).
        spec: the plain-data steps (preprocess.json without the mean bytes).
        mean: the (C, H, W) float32 mean image tensor, or None.
        layout: "HWC", "CHW", "NHWC" or "NCHW" (default: see ``caffe_layout``).
        pixel_range: 255 or 1 (default: 255 for integer dtypes, 1 for floating ones).

    Returns:
        The (N, C, h, w) float32 tensor to feed the net input ``spec["input"]``.
    """
    x = torch.as_tensor(images)
    c = int(spec["channels"])
    layout = (layout or caffe_layout(tuple(x.shape), c)).upper()
    if layout not in CAFFE_LAYOUTS or x.dim() != len(layout):
        raise ValueError(f"layout {layout!r} does not fit images of shape {tuple(x.shape)}; "
                         f"choose one of {CAFFE_LAYOUTS}")
    if pixel_range is None:
        pixel_range = 1 if x.is_floating_point() else 255
    if pixel_range not in (1, 255):
        raise ValueError(f"pixel_range must be 255 (0-255 pixels) or 1 (0-1); got {pixel_range}")
    if len(layout) == 3:
        x = x.unsqueeze(0)
    if layout.endswith("HWC"):
        x = x.permute(0, 3, 1, 2)
    if x.shape[1] != c:
        raise ValueError(f"images have {x.shape[1]} channel(s); the net reads {c} "
                         f"({'RGB images' if c == 3 else 'grey images' if c == 1 else ''})")
    x = x.to(torch.float32)
    if spec["input_order"] == "bgr" and c == 3:
        x = x.flip(1)  # RGB -> BGR
    if pixel_range == 1:
        x = x * 255.0
    h, w = int(x.shape[2]), int(x.shape[3])
    if mean is not None and (h, w) != (int(mean.shape[1]), int(mean.shape[2])):
        mh, mw = int(mean.shape[1]), int(mean.shape[2])
        raise ValueError(
            f"images are {h}x{w} (HxW) but the mean image is {mh}x{mw}: resize them to {mh}x{mw} "
            f"first (as the training data was, e.g. cv2.resize(img, ({mw}, {mh})))")
    crop = int(spec["crop_size"])
    h0 = w0 = 0
    if crop:
        if h < crop or w < crop:
            raise ValueError(f"images are {h}x{w} (HxW), smaller than crop_size {crop}: resize "
                             f"them so both sides are at least {crop}")
        h0, w0 = (h - crop) // 2, (w - crop) // 2  # Caffe's TEST centre crop
        x = x[:, :, h0:h0 + crop, w0:w0 + crop]
    if mean is not None:
        x = x - mean.to(x.device)[None, :, h0:h0 + x.shape[2], w0:w0 + x.shape[3]]
    elif spec["mean_values"]:
        mv = torch.tensor(spec["mean_values"], dtype=torch.float32, device=x.device)
        if mv.numel() == 1:
            mv = mv.repeat(c)
        x = x - mv[None, :, None, None]
    if float(spec["scale"]) != 1.0:
        x = x * float(spec["scale"])
    return x.contiguous()


def caffe_read_mean(path) -> torch.Tensor | None:
    """The mean image stored in preprocess.json (little-endian float32, base64), or None."""
    import base64
    import json

    with open(path, encoding="utf-8") as f:
        m = json.load(f)["mean_image"]
    if not m:
        return None
    raw = bytearray(base64.b64decode(m["base64"]))
    t = torch.frombuffer(raw, dtype=torch.float32)
    if not _caffe_little_endian():
        t = t.view(torch.uint8).view(-1, 4).flip(1).reshape(-1).view(torch.float32)
    return t.reshape(m["shape"]).clone()


def _caffe_little_endian() -> bool:
    import sys

    return sys.byteorder == "little"
