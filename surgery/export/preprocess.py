"""The preprocessing a Caffe net expects, as plain data carried into its exports.

Caffe nets read BGR, 0-255 pixels with a mean subtracted, cropped and scaled as the data layer's
``transform_param`` says (:mod:`surgery.data.transform`, Caffe's ``DataTransformer``). A
:class:`PreprocessSpec` states those steps for one net input so that ``export torch`` can write
them as ``preprocess(images)`` and ``export onnx --preprocess`` as ONNX nodes in front of the
graph. From an RGB image (uint8 0-255, or float 0-1), in this order:

1. to float32, NCHW; RGB -> BGR when the net reads BGR (3 channels); x255 for 0-1 input;
2. centre crop to ``crop_size``: offsets ``(H - crop) // 2``, ``(W - crop) // 2`` (Caffe TEST);
3. subtract the mean: the mean image cropped at the same offsets (so it must have the image's
   full size, as BVLC's ``DataTransformer`` requires), or one value per channel (or one for all);
4. multiply by ``scale``.

These are the float32 operations, in the order, of Caffe's ``DataTransformer`` (TEST) and of
pycaffe's ``caffe.io.Transformer`` (``set_channel_swap``, ``set_raw_scale(255)``, ``set_mean``,
``set_input_scale``), so the results are Caffe's bits.

Imports neither torch nor onnx.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ..errors import DataError, NetError
from ..net import Net, NetState

__all__ = ["PreprocessSpec", "preprocess_spec", "spec_from_layer", "apply_spec"]

ORDERS = ("bgr", "rgb")


@dataclass(frozen=True)
class PreprocessSpec:
    """The steps from an RGB image to one net input, as plain data.

    Attributes:
        input: the net input (blob name) the result feeds.
        channels: C of that input (3 colour, 1 grey).
        input_order: the channel order the net reads: ``"bgr"`` (Caffe's, OpenCV's) or
            ``"rgb"``; only meaningful for 3 channels.
        crop_size: centre crop (0: none).
        mean_values: one value for every channel, or one per channel (net's order); empty
            when a mean image is used or there is no mean.
        mean_image: the (C, H, W) float32 mean image in the net's channel order, or None.
        mean_file: where the mean image was read from (for reports).
        scale: the factor applied after the mean.
        origin: where the spec came from (layer and phase, or the command-line options).
    """

    input: str
    channels: int = 3
    input_order: str = "bgr"
    crop_size: int = 0
    mean_values: tuple[float, ...] = ()
    mean_image: np.ndarray | None = field(default=None, compare=False, repr=False)
    mean_file: str | None = None
    scale: float = 1.0
    origin: str = ""

    def __post_init__(self) -> None:
        if self.input_order not in ORDERS:
            raise DataError(f"input order {self.input_order!r}: choose bgr or rgb")
        if self.channels <= 0:
            raise DataError(f"{self.origin}: channels must be positive")
        n = len(self.mean_values)
        if n and n not in (1, self.channels):
            raise DataError(f"{self.origin}: {n} mean values for {self.channels} channels; give "
                            "one, or one per channel")
        if self.mean_image is not None:
            m = self.mean_image
            if m.ndim != 3 or m.shape[0] != self.channels:
                raise DataError(f"{self.origin}: mean image {self.mean_file or ''} has shape "
                                f"{tuple(m.shape)}, expected ({self.channels}, H, W)")
            if n:
                raise DataError(f"{self.origin}: a mean image and mean values together; "
                                "Caffe refuses this: keep one")
            if self.crop_size and (m.shape[1] < self.crop_size or m.shape[2] < self.crop_size):
                raise DataError(f"{self.origin}: crop_size {self.crop_size} is larger than the "
                                f"mean image ({m.shape[1]}x{m.shape[2]})")
        if self.crop_size < 0:
            raise DataError(f"{self.origin}: crop_size must be >= 0")

    @property
    def swap(self) -> bool:
        """Whether RGB images are reversed to BGR (a 3-channel net that reads BGR)."""
        return self.input_order == "bgr" and self.channels == 3

    @property
    def image_size(self) -> tuple[int, int] | None:
        """The (H, W) images must have: the mean image's, else None (any size >= the crop)."""
        return None if self.mean_image is None else tuple(self.mean_image.shape[1:])  # type: ignore[return-value]

    def output_hw(self, image_hw: Sequence[int]) -> tuple[int, int]:
        """The (H, W) of the net input an (H, W) image becomes."""
        return (self.crop_size, self.crop_size) if self.crop_size else (
            int(image_hw[0]), int(image_hw[1]))

    def steps(self) -> list[str]:
        """The steps in words, for reports and the generated docstrings."""
        out = ["to float32, NCHW"]
        if self.swap:
            out.append("RGB -> BGR")
        out.append("x255 for 0-1 input")
        if self.crop_size:
            out.append(f"centre crop {self.crop_size}x{self.crop_size} (offset (H-{self.crop_size})"
                       f"//2, (W-{self.crop_size})//2)")
        if self.mean_image is not None:
            h, w = self.mean_image.shape[1:]
            out.append(f"minus the mean image {self.mean_file or ''} ({h}x{w}, cropped at the "
                       "same offset)".replace("  ", " "))
        elif self.mean_values:
            out.append(f"minus mean values {list(self.mean_values)} ({self.input_order.upper()})")
        if self.scale != 1:
            out.append(f"x{self.scale!r}")
        return out

    def to_json(self, *, with_mean: bool = True) -> dict[str, Any]:
        """A JSON-able dict; the mean image as little-endian float32 bytes in base64."""
        d: dict[str, Any] = {
            "input": self.input,
            "channels": self.channels,
            "input_order": self.input_order,
            "crop_size": self.crop_size,
            "mean_values": list(self.mean_values),
            "mean_file": self.mean_file,
            "mean_image": None,
            "scale": self.scale,
            "origin": self.origin,
            "steps": self.steps(),
        }
        if self.mean_image is not None:
            m = np.ascontiguousarray(self.mean_image, "<f4")
            d["mean_image"] = {"shape": list(m.shape), "dtype": "float32",
                               "byteorder": "little"}
            if with_mean:
                d["mean_image"]["base64"] = base64.b64encode(m.tobytes()).decode("ascii")
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> PreprocessSpec:
        """The inverse of :meth:`to_json` (with the mean bytes)."""
        mean = None
        if d.get("mean_image"):
            m = d["mean_image"]
            mean = np.frombuffer(base64.b64decode(m["base64"]), "<f4").reshape(m["shape"])
            mean = mean.astype(np.float32)
        return cls(input=d["input"], channels=int(d["channels"]), input_order=d["input_order"],
                   crop_size=int(d["crop_size"]), mean_values=tuple(d["mean_values"]),
                   mean_image=mean, mean_file=d.get("mean_file"), scale=float(d["scale"]),
                   origin=d.get("origin", ""))


def spec_from_layer(net: Net, layer_name: str | None = None, *, input_order: str = "bgr",
                    channels: int | None = None) -> PreprocessSpec | None:
    """The spec a train_val net's TEST data layer implies (its ``transform_param``).

    Rules: (1) the TEST net's data layers (no bottoms, a ``transform_param`` or a Data/ImageData
    type) are candidates; ``layer_name`` picks one, else there must be exactly one. (2) Its
    first top is the input; the mean file is found as :func:`surgery.data.dataset` finds it
    (working directory, then the prototxt's folder). (3) A layer without ``transform_param``
    gets Caffe's defaults (no mean, scale 1, no crop).

    Returns:
        The spec, or None when the TEST net has no such data layer (a deploy net).

    Raises:
        DataError: several candidate layers and no ``layer_name``; a missing or bad mean file;
            fields Caffe refuses together.
    """
    from ..data.mean import read_mean
    from ..data.source import resolve_path
    from ..data.transform import TransformParam
    from ..dataflow import resolve

    flow = resolve(net, NetState("TEST"))
    cands = [n.layer for n in flow.nodes if not n.inputs and n.layer.tops and (
        "transform_param" in n.layer.extra or n.layer.type in ("Data", "ImageData"))]
    if layer_name is not None:
        cands = [c for c in cands if c.name == layer_name]
        if not cands:
            raise DataError(f"{net.source or 'net'}: no TEST data layer {layer_name!r} with a "
                            "transform_param")
    if not cands:
        return None
    if len(cands) > 1:
        raise DataError(f"{net.source or 'net'}: several TEST data layers "
                        f"({', '.join(c.name for c in cands)}); name the one to carry")
    layer = cands[0]
    where = f"{net.source or 'net'}: layer {layer.name!r} ({layer.type}): "
    p = TransformParam.from_dict(layer.extra.get("transform_param"), where)
    mean = None
    mean_file = None
    if p.mean_file is not None:
        r = resolve_path(p.mean_file, "transform_param.mean_file", net_source=net.source,
                         where=where, must_be="file")
        mean, mean_file = read_mean(r.path), str(r.path)
    c = channels or (mean.shape[0] if mean is not None else
                     len(p.mean_value) if len(p.mean_value) > 1 else
                     1 if p.force_gray else _first_conv_channels(flow, layer.tops[0]) or 3)
    return PreprocessSpec(input=layer.tops[0], channels=c, input_order=input_order,
                          crop_size=p.crop_size, mean_values=p.mean_value, mean_image=mean,
                          mean_file=mean_file, scale=p.scale,
                          origin=f"transform_param of layer {layer.name!r} (TEST)")


def _first_conv_channels(flow: Any, blob: str) -> int | None:
    try:
        value = flow.latest(blob)
    except NetError:
        return None
    for consumer, _ in flow.consumers(value):
        ps = consumer.layer.params
        if consumer.layer.type == "Convolution" and ps and ps[0].data is not None:
            return int(ps[0].data.shape[1]) * int(consumer.layer.attrs.get("group", 1))
    return None


def preprocess_spec(
    net: Net,
    phase: str = "test",
    *,
    mean_file: str | None = None,
    mean_values: Sequence[float] | None = None,
    scale: float | None = None,
    crop_size: int | None = None,
    input_order: str | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
) -> PreprocessSpec | None:
    """The spec for ``net``: from the options when any of mean/scale/crop is given, else from
    the TEST data layer's ``transform_param`` (:func:`spec_from_layer`).

    Rules for the options (a deploy net): (1) the spec feeds the net's only image input (an
    ``Input`` top or a data layer's first top, in ``phase``); (2) channels come from the mean
    image, else the input's shape, else the mean values, else 3; (3) with a mean image larger
    than a square net input and no ``crop_size``, the crop is the input's size (as the
    train_val's ``crop_size`` would say); (4) ``input_order`` (default ``bgr``) applies to
    both ways.

    Returns:
        The spec, or None when the net carries none and no option was given.

    Raises:
        DataError: a bad mean file, mean values that do not fit the channels, a net with
            several image inputs, a mean image that does not fit the input and no crop.
    """
    order = (input_order or "bgr").lower()
    if order not in ORDERS:
        raise DataError(f"--input-order {input_order!r}: choose bgr or rgb")
    if mean_file is None and mean_values is None and scale is None and crop_size is None:
        spec = spec_from_layer(net, input_order=order)
        if spec is not None and input_shapes and spec.input in input_shapes:
            shape = tuple(input_shapes[spec.input])
            if len(shape) == 4 and shape[1] != spec.channels:
                spec = replace(spec, channels=int(shape[1]))
        return spec
    from ..data.mean import read_mean

    name, shape = _image_input(net, phase, input_shapes)
    mean = read_mean(mean_file) if mean_file is not None else None
    mv = tuple(float(v) for v in (mean_values or ()))
    if mean is not None:
        c = int(mean.shape[0])
    elif shape is not None and len(shape) == 4:
        c = int(shape[1])
    else:
        c = len(mv) if len(mv) > 1 else 3
    crop = int(crop_size or 0)
    origin = "the export options"
    if mean is not None and not crop and shape is not None and len(shape) == 4:
        h, w = int(shape[2]), int(shape[3])
        if (h, w) != tuple(mean.shape[1:]):
            if h != w or h > min(mean.shape[1:]):
                raise DataError(
                    f"{origin}: the mean image is {mean.shape[1]}x{mean.shape[2]} but the input "
                    f"{name!r} is {h}x{w}; give --crop-size (Caffe crops squares) or a mean of "
                    "the input's size")
            crop = h
            origin += f" (crop_size {h}: the input's size)"
    return PreprocessSpec(input=name, channels=c, input_order=order, crop_size=crop,
                          mean_values=mv, mean_image=mean, mean_file=mean_file,
                          scale=1.0 if scale is None else float(scale), origin=origin)


def _image_input(net: Net, phase: str, input_shapes: Mapping[str, Sequence[int]] | None
                 ) -> tuple[str, tuple[int, ...] | None]:
    from ..dataflow import resolve
    from ..layers import is_data
    from ..shapes import starting_shapes, top_shapes

    flow = resolve(net, NetState(phase.upper()))
    start, _ = starting_shapes(flow, input_shapes)
    found: list[tuple[str, tuple[int, ...] | None]] = []
    for node in flow.nodes:
        lay = node.layer
        if lay.type == "Input":
            try:
                shapes = top_shapes(lay, [])
            except Exception:  # noqa: BLE001 -- a shapeless Input: given by --input-shape
                shapes = [None] * len(lay.tops)
            for t, s in zip(lay.tops, shapes, strict=False):
                found.append((t, start.get(t) or (tuple(s) if s else None)))
        elif is_data(lay) and not node.inputs and lay.tops:
            found.append((lay.tops[0], start.get(lay.tops[0])))
    images = [f for f in found if f[1] is None or len(f[1]) == 4]
    if len(images) != 1:
        raise DataError(f"{net.source or 'net'}: preprocessing needs one image input; the "
                        f"{phase.upper()} net has {[f[0] for f in found]}")
    return images[0]


def apply_spec(spec: PreprocessSpec, images: np.ndarray, *, layout: str = "NHWC",
               pixel_range: int | None = None) -> np.ndarray:
    """The steps in numpy (float32), for tests and non-torch callers.

    Args:
        spec: the steps.
        images: RGB images, (H, W, C) or (N, H, W, C) with ``layout="NHWC"``, (N, C, H, W)
            with ``"NCHW"``.
        layout: ``"NHWC"`` (a 3-D array is one HWC image) or ``"NCHW"``.
        pixel_range: 255 or 1 (default: 255 for integer arrays, 1 for floats).

    Returns:
        The (N, C, h, w) float32 net input.

    Raises:
        DataError: an image that does not fit the crop or the mean image.
    """
    x = np.asarray(images)
    rng = pixel_range or (255 if x.dtype.kind in "ui" else 1)
    if layout.upper() == "NHWC":
        x = x[None] if x.ndim == 3 else x
        x = x.transpose(0, 3, 1, 2)
    x = x.astype(np.float32)
    if spec.swap:
        x = x[:, ::-1]
    if rng == 1:
        x = x * np.float32(255)
    h, w = x.shape[2:]
    size = spec.image_size
    if size is not None and (h, w) != size:
        raise DataError(f"images are {h}x{w} but the mean image is {size[0]}x{size[1]}: resize "
                        f"them to {size[1]}x{size[0]} (W x H) first")
    crop = spec.crop_size
    h0 = w0 = 0
    if crop:
        if h < crop or w < crop:
            raise DataError(f"images are {h}x{w}, smaller than crop_size {crop}: resize them")
        h0, w0 = (h - crop) // 2, (w - crop) // 2
        x = x[:, :, h0:h0 + crop, w0:w0 + crop]
    if spec.mean_image is not None:
        hh, ww = x.shape[2:]
        x = x - spec.mean_image[None, :, h0:h0 + hh, w0:w0 + ww]
    elif spec.mean_values:
        mv = np.asarray(spec.mean_values, np.float32)
        mv = mv if len(mv) == x.shape[1] else np.repeat(mv[:1], x.shape[1])
        x = x - mv[None, :, None, None]
    if spec.scale != 1:
        x = x * np.float32(spec.scale)
    return np.ascontiguousarray(x, np.float32)


def check_input(spec: PreprocessSpec, inputs: Sequence[str],
                shape: Sequence[int] | None) -> None:
    """Check that ``spec`` feeds one of the export's ``inputs`` and fits its ``shape``.

    Raises:
        DataError: the input is not exported, or its channels or size differ from what the
            steps produce.
    """
    if spec.input not in inputs:
        raise DataError(f"preprocessing ({spec.origin}) feeds {spec.input!r}, which is not an "
                        f"input of the export (inputs: {list(inputs)})")
    if shape is None or len(shape) != 4:
        return
    c, h, w = (int(d) for d in shape[1:])
    if c != spec.channels:
        raise DataError(f"preprocessing ({spec.origin}) makes {spec.channels} channel(s) but "
                        f"the input {spec.input!r} has {c}; fix --input-shape or the mean")
    size = spec.image_size
    out = spec.output_hw(size) if size else (spec.crop_size, spec.crop_size)
    if out[0] and (out[0], out[1]) != (h, w):
        raise DataError(
            f"preprocessing ({spec.origin}) makes {out[0]}x{out[1]} inputs but {spec.input!r} "
            f"is {h}x{w}; give --input-shape {spec.input}=N,{c},{out[0]},{out[1]} or "
            "--crop-size")
