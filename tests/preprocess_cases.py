"""Preprocessing cases shared by tests/test_preprocess.py and tools/record_preprocess_golden.py
(which records what the reference Caffe makes of them).

The image is natural-looking but deterministic: smooth RGB gradients, a disc, a rectangle and a
fine texture, from integer arithmetic only, so every numpy builds the same pixels. The mean
image (for CaffeNet's ``mean_file``; no real ``imagenet_mean.binaryproto`` is available) is a
smooth field (integers + 0.25), written with our own ``.binaryproto`` writer.

Each case is one zoo train_val net's TEST data layer (its ``transform_param`` as published),
fed one image:

* ``data``: Caffe's ``Data`` layer reading an LMDB holding the image (BGR, as ``convert_imageset``
  stores it) in TEST: its ``data`` top (batch 1), the DataTransformer's output.
* ``transformer``: pycaffe's ``caffe.io.Transformer`` (set_transpose, set_channel_swap,
  set_raw_scale(255), set_mean) on the image as float 0-1, already of the net input's size (the
  Transformer does not crop: a mean image is given to it cropped at the centre).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

ZOO = Path(__file__).resolve().parents[2] / "shared" / "zoo"
# the mean path CaffeNet's train_val names, relative to the working directory
CAFFENET_MEAN = "data/ilsvrc12/imagenet_mean.binaryproto"

# name -> (train_val, image (H, W), net input size)
CASES = {
    "caffenet": ("bvlc_reference_caffenet/train_val.prototxt", (256, 256), 227),
    "googlenet": ("bvlc_googlenet/train_val.prototxt", (241, 301), 224),
    "squeezenet": ("squeezenet_v1.1/train_val.prototxt", (241, 301), 227),
}


def make_image(h: int, w: int) -> np.ndarray:
    """An (H, W, 3) RGB uint8 image: gradients, a disc, a rectangle, a fine texture."""
    y, x = np.mgrid[0:h, 0:w].astype(np.int64)
    r = 40 + x * 180 // max(w - 1, 1)
    g = 30 + y * 190 // max(h - 1, 1)
    b = 220 - (x + y) * 170 // max(h + w - 2, 1)
    disc = (x - w * 5 // 8) ** 2 + (y - h * 3 // 8) ** 2 < (min(h, w) // 5) ** 2
    rect = (x > w // 8) & (x < w * 3 // 8) & (y > h // 2) & (y < h * 7 // 8)
    r, g, b = np.where(disc, 230, r), np.where(disc, 60 + x % 40, g), np.where(disc, 50, b)
    r, g, b = np.where(rect, 20 + y % 30, r), np.where(rect, 150, g), np.where(rect, 210, b)
    texture = (x // 3 + y // 5) % 5 - 2
    img = np.stack([r, g, b], axis=-1) + texture[..., None]
    return np.clip(img, 0, 255).astype(np.uint8)


def mean_image(h: int = 256, w: int = 256) -> np.ndarray:
    """A smooth (3, H, W) BGR float32 mean near ImageNet's (104, 117, 123), every value an
    integer + 0.25 (a fraction, exactly representable)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.int64)
    base = np.array([104, 117, 123], np.int64)[:, None, None]
    field = x // 16 - y // 32 + ((x - w // 2) ** 2 + (y - h // 2) ** 2) // 2048 - 10
    return (base + field[None] * np.array([1, 2, 3])[:, None, None] + 0.25).astype(np.float32)


def image01(img: np.ndarray) -> np.ndarray:
    """The 0-1 float32 image pycaffe's Transformer path starts from."""
    return img.astype(np.float32) / np.float32(255)


def centre(img_hwc: np.ndarray, size: int) -> np.ndarray:
    """The centre ``size`` x ``size`` crop of an HWC image (Caffe's TEST offsets)."""
    h, w = img_hwc.shape[:2]
    h0, w0 = (h - size) // 2, (w - size) // 2
    return img_hwc[h0:h0 + size, w0:w0 + size]


# The recorded arrays are stored losslessly and small: every value Caffe makes here is a
# multiple of 1/4 (integer pixels, means integer or + 0.25), so ``value * 4`` as int16, with
# successive differences (smooth images compress well then). The Transformer path's result is
# stored as the SHA-256 of its float32 bytes (compared bit for bit).
def encode(a: np.ndarray) -> np.ndarray:
    """``a`` (float32, multiples of 1/4) -> int16 differences; raises if not lossless."""
    q = np.round(a.astype(np.float64) * 4).astype(np.int32)
    if not np.array_equal(q.astype(np.float32) / np.float32(4), a):
        raise ValueError("values are not multiples of 1/4: cannot store them losslessly")
    d = np.diff(q.reshape(-1), prepend=0)
    if d.min() < -(2**15) or d.max() >= 2**15:
        raise ValueError("differences do not fit int16")
    return d.astype(np.int16)


def decode(d: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The inverse of :func:`encode`."""
    return (np.cumsum(d.astype(np.int32)).astype(np.float32) / np.float32(4)).reshape(shape)
