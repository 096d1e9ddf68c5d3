"""Per-type facts about Caffe layers: which ``*_param`` message a type uses, defaults (read
from the proto descriptor, never copied by hand), learnable blobs, and layer roles.
"""

from __future__ import annotations

import functools
import re
from typing import Any

from .errors import UnsupportedLayerError
from .net import Layer

__all__ = [
    "PARAM_FIELD",
    "param_field_for",
    "default",
    "attr",
    "LOSS_TYPES",
    "WEIGHT_BIAS_TYPES",
    "ints",
    "floats",
    "DATA_TYPES",
    "LEARNABLE_TYPES",
    "is_loss",
    "is_data",
    "bn_layout",
]

# The LayerParameter field holding each type's parameters. Types not listed fall back to
# CamelCase -> snake_case + "_param" when such a field exists (see param_field_for).
PARAM_FIELD: dict[str, str] = {
    "Convolution": "convolution_param",
    "Deconvolution": "convolution_param",
    "ConvolutionDepthwise": "convolution_param",
    "DepthwiseConvolution": "convolution_param",
    "Im2col": "convolution_param",
    "InnerProduct": "inner_product_param",
    "Pooling": "pooling_param",
    "ReLU": "relu_param",
    "PReLU": "prelu_param",
    "ELU": "elu_param",
    "Sigmoid": "sigmoid_param",
    "TanH": "tanh_param",
    "Softmax": "softmax_param",
    "SoftmaxWithLoss": "softmax_param",
    "LRN": "lrn_param",
    "BatchNorm": "batch_norm_param",
    "Scale": "scale_param",
    "Bias": "bias_param",
    "Eltwise": "eltwise_param",
    "Concat": "concat_param",
    "Slice": "slice_param",
    "Flatten": "flatten_param",
    "Reshape": "reshape_param",
    "Crop": "crop_param",
    "Tile": "tile_param",
    "Dropout": "dropout_param",
    "Input": "input_param",
    "ArgMax": "argmax_param",
    "Reduction": "reduction_param",
    "MVN": "mvn_param",
    "Power": "power_param",
    "Exp": "exp_param",
    "Log": "log_param",
    "Threshold": "threshold_param",
    "Clip": "clip_param",
    "Swish": "swish_param",
    "Embed": "embed_param",
    "Data": "data_param",
    "ImageData": "image_data_param",
    "HDF5Data": "hdf5_data_param",
    "HDF5Output": "hdf5_output_param",
    "MemoryData": "memory_data_param",
    "WindowData": "window_data_param",
    "DummyData": "dummy_data_param",
    "Python": "python_param",
    "Parameter": "parameter_param",
    "Accuracy": "accuracy_param",
    "ContrastiveLoss": "contrastive_loss_param",
    "HingeLoss": "hinge_loss_param",
    "InfogainLoss": "infogain_loss_param",
    "SPP": "spp_param",
    "Recurrent": "recurrent_param",
    "RNN": "recurrent_param",
    "LSTM": "recurrent_param",
    "Permute": "permute_param",
    "Normalize": "norm_param",
    "PriorBox": "prior_box_param",
    "DetectionOutput": "detection_output_param",
    "AnnotatedData": "annotated_data_param",
    "MultiBoxLoss": "multibox_loss_param",
    "DetectionEvaluate": "detection_evaluate_param",
    "Upsample": "upsample_param",
    "ImageSegData": "image_data_param",
    "Interp": "interp_param",
    "ShuffleChannel": "shuffle_channel_param",
    "ROIPooling": "roi_pooling_param",
    "PSROIPooling": "psroi_pooling_param",
}

#: Types whose learnable blobs are a weight and an optional bias (``bias_term``).
WEIGHT_BIAS_TYPES = frozenset(
    {
        "Convolution",
        "Deconvolution",
        "InnerProduct",
        "ConvolutionDepthwise",
        "DepthwiseConvolution",
        "Embed",
    }
)

LOSS_TYPES = frozenset(
    {
        "SoftmaxWithLoss",
        "EuclideanLoss",
        "SigmoidCrossEntropyLoss",
        "HingeLoss",
        "InfogainLoss",
        "MultinomialLogisticLoss",
        "ContrastiveLoss",
        "MultiBoxLoss",
        "SmoothL1Loss",
    }
)
DATA_TYPES = frozenset(
    {
        "Data",
        "ImageData",
        "HDF5Data",
        "MemoryData",
        "WindowData",
        "DummyData",
        "AnnotatedData",
        "VideoData",
        "Python",
        "DenseImageData",  # SegNet: image + label image
        "ImageSegData",  # DeepLab v2 / PSPNet training fork: image + label image
        "ImageLabelmapData",  # HED: image + label map (image_data_param)
    }
)
# Types whose learnable blobs are defined by Caffe (others may still carry blobs in a file).
LEARNABLE_TYPES = frozenset(
    {
        "Convolution",
        "Deconvolution",
        "ConvolutionDepthwise",
        "DepthwiseConvolution",
        "InnerProduct",
        "Scale",
        "Bias",
        "PReLU",
        "BatchNorm",
        "Embed",
        "Normalize",
        "Parameter",
        "BN",  # fork type: 4 or 2 blobs, see bn_layout
    }
)

# The fork ``BN`` layer's ``bn_param`` fields. Our proto holds PSPNet's BNParameter
# (yjxiong/caffe, hszhao/PSPNet); SegNet's fields can only be set through the API.
_BN_PSPNET_FIELDS = ("slope_filler", "bias_filler", "momentum", "eps", "frozen", "engine")
_BN_SEGNET_FIELDS = ("scale_filler", "shift_filler", "bn_mode")


def ints(v: Any) -> list[int]:
    """A repeated-or-scalar proto value as a list of ints (None -> [])."""
    if v is None:
        return []
    if isinstance(v, (list, tuple)):
        return [int(x) for x in v]
    return [int(v)]


def floats(v: Any) -> list[float]:
    """A repeated-or-scalar proto value as a list of floats (None -> [])."""
    if v is None:
        return []
    if isinstance(v, (list, tuple)):
        return [float(x) for x in v]
    return [float(v)]


def bn_layout(layer: Layer) -> str:
    """Which fork's ``BN`` ``layer`` is: ``"pspnet"`` or ``"segnet"``.

    PSPNet's BN (hszhao/PSPNet ``bn_layer.cpp``, from yjxiong/caffe) has 4 blobs of shape
    (1, C, 1, 1): slope, bias, moving mean, moving variance. SegNet's
    (alexgkendall/caffe-segnet ``bn_layer.cpp``) has 2: scale, shift. Rules:

    1. Loaded blobs decide: 4 -> pspnet, 2 -> segnet; any other count is ambiguous.
    2. Without weights, the ``bn_param`` fields the layer sets decide: SegNet's
       (``scale_filler``, ``shift_filler``, ``bn_mode``) -> segnet; otherwise pspnet (the
       BNParameter our proto reads from files is PSPNet's).
    3. Fields of both forks, or one fork's fields with the other's blob count, are ambiguous.

    Raises:
        UnsupportedLayerError: the layout is ambiguous (says what conflicts).
    """
    psp = [k for k in _BN_PSPNET_FIELDS if k in layer.attrs]
    seg = [k for k in _BN_SEGNET_FIELDS if k in layer.attrs]
    n = sum(1 for p in layer.params if p.data is not None)
    by_blobs = {4: "pspnet", 2: "segnet"}.get(n) if n else None
    by_fields = "segnet" if seg else ("pspnet" if psp else None)
    problem = None
    if n and by_blobs is None:
        problem = (f"{n} loaded blob(s), but PSPNet's BN has 4 (slope, bias, mean, variance) "
                   "and SegNet's 2 (scale, shift)")
    elif psp and seg:
        problem = (f"bn_param mixes PSPNet's fields ({', '.join(psp)}) and SegNet's "
                   f"({', '.join(seg)})")
    elif by_blobs and by_fields and by_blobs != by_fields:
        fields = ", ".join(seg or psp)
        problem = (f"{n} loaded blobs ({by_blobs}'s layout) but bn_param sets {by_fields}'s "
                   f"fields ({fields})")
    if problem:
        raise UnsupportedLayerError(
            f"layer {layer.name!r} (BN): cannot tell which fork's BN this is: {problem}. "
            "Fix the weights or the bn_param fields for one fork."
        )
    return by_blobs or by_fields or "pspnet"


def is_loss(layer: Layer) -> bool:
    """True for loss layers (by type, or by a name ending in 'Loss')."""
    return layer.type in LOSS_TYPES or layer.type.endswith("Loss")


def is_data(layer: Layer) -> bool:
    """True for layers that read a dataset (no bottoms, data-source types)."""
    return layer.type in DATA_TYPES and not layer.bottoms


@functools.lru_cache(maxsize=1)
def _layer_descriptor() -> Any:
    from ._proto import caffe_pb2  # noqa: PLC0415  (descriptor facts only)

    return caffe_pb2.LayerParameter.DESCRIPTOR


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


@functools.cache
def param_field_for(layer_type: str) -> str | None:
    """The ``LayerParameter`` field that holds ``layer_type``'s parameters, if any."""
    if layer_type in PARAM_FIELD:
        return PARAM_FIELD[layer_type]
    guess = _snake(layer_type) + "_param"
    return guess if guess in _layer_descriptor().fields_by_name else None


_MISSING = object()


@functools.cache
def _field(param_field: str, key: str) -> Any:
    desc = _layer_descriptor().fields_by_name.get(param_field)
    if desc is None or desc.message_type is None:
        return None
    return desc.message_type.fields_by_name.get(key)


def default(param_field: str, key: str) -> Any:
    """The proto default of ``<param_field>.<key>`` (enum defaults as names, repeated -> []).

    Raises:
        KeyError: the message has no such field.
    """
    fd = _field(param_field, key)
    if fd is None:
        raise KeyError(f"{param_field} has no field {key!r}")
    if _is_repeated(fd):
        return []
    if fd.message_type is not None:
        return {}
    if fd.enum_type is not None:
        return fd.enum_type.values_by_number[fd.default_value].name
    return fd.default_value


def _is_repeated(fd: Any) -> bool:
    # FieldDescriptor.label is deprecated in newer protobuf; is_repeated is newer.
    rep = getattr(fd, "is_repeated", None)
    if rep is not None and not callable(rep):
        return bool(rep)
    return fd.label == fd.LABEL_REPEATED


def attr(layer: Layer, key: str, fallback: Any = _MISSING) -> Any:
    """``layer.attrs[key]``, or the proto default of the layer's ``*_param`` field.

    ``fallback`` is returned when the type has no param message or no such field (fork types).
    """
    if key in layer.attrs:
        return layer.attrs[key]
    field_name = layer.param_field or param_field_for(layer.type)
    if field_name is not None and _field(field_name, key) is not None:
        return default(field_name, key)
    if fallback is _MISSING:
        raise KeyError(f"layer {layer.name!r} ({layer.type}) has no parameter {key!r}")
    return fallback
