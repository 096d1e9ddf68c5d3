"""Caffe's ``DataTransformer``: the one place that knows crop, mirror, mean and scale.

For one (C, H, W) image, in BGR order as stored (uint8 pixels or ``float_data``), Caffe computes
(``data_transformer.cpp``, BVLC master)::

    do_mirror = mirror && Rand(2)                  # drawn first, in TRAIN *and* TEST
    h_off, w_off = Rand(H - crop + 1), Rand(W - crop + 1)   if TRAIN and crop_size
                 = (H - crop) / 2, (W - crop) / 2           if TEST and crop_size (rounds down)
    top[c, h, w'] = (x[c, h_off + h, w_off + w] - mean[c, h_off + h, w_off + w]) * scale
        with w' = crop - 1 - w when do_mirror, else w

so the mean file is cropped at the image's offset and must have the image's full size;
``mean_value`` is one value for every channel or one per channel; without a mean the pixel is
only scaled. Everything is computed in float32, as Caffe's ``Dtype``; the same operations in the
same order give Caffe's bits.

Caffe mirrors whenever ``mirror: true``, whatever the phase (its TEST layers set it false); the
random crop offset is TRAIN only. Random draws here come from a ``numpy.random.Generator`` the
caller passes, so a seed reproduces them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import DataError, UnsupportedLayerError

__all__ = ["TransformParam", "Transformer"]

# SSD-fork augmentation fields of TransformationParameter we do not implement.
_UNSUPPORTED = ("resize_param", "noise_param", "emit_constraint", "distort_param", "expand_param")


@dataclass(frozen=True)
class TransformParam:
    """The fields of ``transform_param`` that Caffe's BVLC ``DataTransformer`` reads."""

    scale: float = 1.0
    mirror: bool = False
    crop_size: int = 0
    mean_file: str | None = None
    mean_value: tuple[float, ...] = ()
    force_color: bool = False
    force_gray: bool = False

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, where: str = "") -> TransformParam:
        """From ``Layer.extra["transform_param"]`` (a plain dict of the fields set).

        Raises:
            UnsupportedLayerError: an SSD-fork augmentation field is set.
            DataError: mean_file and mean_value together, or force_color with force_gray.
        """
        d = dict(d or {})
        bad = [k for k in _UNSUPPORTED if k in d]
        if bad:
            raise UnsupportedLayerError(
                f"{where}transform_param.{', '.join(bad)} (SSD fork augmentation) is not "
                "supported; remove it or preprocess the data beforehand"
            )
        mv = d.get("mean_value", [])
        mv = tuple(float(v) for v in (mv if isinstance(mv, (list, tuple)) else [mv]))
        p = cls(
            scale=float(d.get("scale", 1.0)),
            mirror=bool(d.get("mirror", False)),
            crop_size=int(d.get("crop_size", 0)),
            mean_file=d.get("mean_file"),
            mean_value=mv,
            force_color=bool(d.get("force_color", False)),
            force_gray=bool(d.get("force_gray", False)),
        )
        if p.mean_file is not None and p.mean_value:
            raise DataError(f"{where}transform_param sets both mean_file and mean_value; "
                            "Caffe refuses this: keep one")
        if p.force_color and p.force_gray:
            raise DataError(f"{where}transform_param sets both force_color and force_gray; "
                            "Caffe refuses this: keep one")
        return p


class Transformer:
    """Caffe's ``DataTransformer`` for one layer and phase.

    Args:
        param: the layer's transform parameters.
        phase: ``"TRAIN"`` or ``"TEST"`` (any case).
        mean: the mean file's (C, H, W) float32 array when ``param.mean_file`` is set.
        where: prefix for error messages (file and layer).
    """

    def __init__(self, param: TransformParam, phase: str, *, mean: np.ndarray | None = None,
                 where: str = "") -> None:
        self.param = param
        self.phase = phase.upper()
        self.where = where
        if param.mean_file is not None and mean is None:
            raise DataError(f"{where}transform_param.mean_file {param.mean_file!r} was not read")
        self.mean = None if mean is None else np.ascontiguousarray(mean, np.float32)
        self.scale = np.float32(param.scale)
        self._mean_values = np.asarray(param.mean_value, np.float32)

    # -- shapes -----------------------------------------------------------------------------
    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, int, int]:
        """The (C, H, W) a (C, H, W) input becomes (Caffe's ``InferBlobShape``)."""
        c, h, w = shape
        crop = self.param.crop_size
        return (c, crop, crop) if crop else (c, h, w)

    def check(self, shape: tuple[int, ...], item: str) -> None:
        """Caffe's CHECKs on one input's shape against crop and mean.

        Raises:
            DataError: crop larger than the image, mean of another shape, or a mean_value
                count that is neither 1 nor the channel count.
        """
        c, h, w = shape
        crop = self.param.crop_size
        if crop and (h < crop or w < crop):
            raise DataError(f"{self.where}{item}: crop_size {crop} is larger than the image "
                            f"({h}x{w}); lower crop_size or resize the images")
        if self.mean is not None and self.mean.shape != (c, h, w):
            raise DataError(
                f"{self.where}{item}: mean_file {self.param.mean_file!r} has shape "
                f"{tuple(self.mean.shape)} but the data is {(c, h, w)} (C, H, W); Caffe needs "
                "the mean of the full-size images (compute_image_mean on the same database)"
            )
        n = len(self._mean_values)
        if n and n != 1 and n != c:
            raise DataError(f"{self.where}{item}: {n} mean_value entries for {c} channels; "
                            "give one, or one per channel")

    # -- the transform ----------------------------------------------------------------------
    @property
    def random(self) -> bool:
        """Whether :meth:`draw` needs a generator (mirror, or a TRAIN crop)."""
        return bool(self.param.mirror or (self.param.crop_size and self.phase == "TRAIN"))

    def draw(self, shape: tuple[int, ...], rng: np.random.Generator | None
             ) -> tuple[bool, int, int]:
        """The random choices for one image: (mirror, h_off, w_off), in Caffe's draw order."""
        _, h, w = shape
        crop = self.param.crop_size
        if self.random and rng is None:
            raise ValueError("this transform draws random numbers: pass a numpy Generator")
        mirror = bool(self.param.mirror and rng.integers(2))  # type: ignore[union-attr]
        h_off = w_off = 0
        if crop:
            if self.phase == "TRAIN":
                h_off = int(rng.integers(h - crop + 1))  # type: ignore[union-attr]
                w_off = int(rng.integers(w - crop + 1))  # type: ignore[union-attr]
            else:
                h_off, w_off = (h - crop) // 2, (w - crop) // 2
        return mirror, h_off, w_off

    def __call__(self, image: np.ndarray, rng: np.random.Generator | None = None,
                 item: str = "image") -> np.ndarray:
        """Transform one (C, H, W) uint8 or float image into Caffe's float32 top.

        Raises:
            DataError: the image does not fit the crop or the mean (see :meth:`check`).
        """
        shape = image.shape
        self.check(shape, item)
        mirror, h_off, w_off = self.draw(shape, rng)
        return self.apply(image, mirror, h_off, w_off)

    def window(self, mirror: bool, h_off: int, w_off: int) -> tuple[slice, slice]:
        """The (rows, columns) slices of the crop, the columns reversed when mirrored."""
        crop = self.param.crop_size
        if not crop:
            return slice(None), (slice(None, None, -1) if mirror else slice(None))
        rows = slice(h_off, h_off + crop)
        if mirror:
            return rows, slice(w_off + crop - 1, w_off - 1 if w_off else None, -1)
        return rows, slice(w_off, w_off + crop)

    def apply(self, image: np.ndarray, mirror: bool, h_off: int, w_off: int) -> np.ndarray:
        """The transform with the random choices given (no checks).

        Crop and mirror are one strided view, so the pixels are copied once, into the float32
        result (a mirrored window minus the same mirrored window of the mean is the mirror of
        Caffe's difference: the same numbers in the same places).
        """
        rows, cols = self.window(mirror, h_off, w_off)
        mean = None if self.mean is None else self.mean[:, rows, cols]
        return self.finish(image[:, rows, cols], mean)

    def finish(self, pixels: np.ndarray, mean: np.ndarray | None = None) -> np.ndarray:
        """``(pixels - mean) * scale`` in float32 for cropped, mirrored ``pixels`` (C, h, w)
        or a batch (N, C, h, w); ``mean``: the mean file's matching windows."""
        x = np.empty(pixels.shape, np.float32)
        if mean is not None:
            np.subtract(pixels, mean, out=x)  # float32(pixel) - mean, as Caffe
        elif len(self._mean_values):
            c = pixels.shape[-3]
            mv = self._mean_values if len(self._mean_values) == c else np.repeat(
                self._mean_values[:1], c)
            np.subtract(pixels, mv[:, None, None], out=x)
        else:
            np.copyto(x, pixels, casting="unsafe")
        if self.scale != 1:
            np.multiply(x, self.scale, out=x)
        return x

    def finish_batch(self, pixels: np.ndarray, draws: np.ndarray) -> np.ndarray:
        """:meth:`finish` for a batch of uint8 crops, ``draws`` (N, 3) their (mirror, h_off,
        w_off) -- the loader's workers send uint8 and the main process finishes."""
        mean = None
        if self.mean is not None:
            mean = np.stack([self.mean[(slice(None), *self.window(bool(m), int(h), int(w)))]
                             for m, h, w in draws])
        return self.finish(pixels, mean)

    def undo(self, top: np.ndarray) -> np.ndarray:
        """Approximately the pixels a (C, H, W) top came from: scale and mean undone (centre-
        cropped mean for a mean file), for viewing. Mirroring is not undone."""
        x = np.asarray(top, np.float32)
        if self.scale != 0:
            x = x / self.scale
        if self.mean is not None:
            c, h, w = x.shape
            _, mh, mw = self.mean.shape
            h_off, w_off = (mh - h) // 2, (mw - w) // 2
            x = x + self.mean[:, h_off:h_off + h, w_off:w_off + w]
        elif len(self._mean_values):
            mv = self._mean_values
            x = x + (mv if len(mv) == x.shape[0] else np.repeat(mv[:1], x.shape[0]))[:, None, None]
        return x

