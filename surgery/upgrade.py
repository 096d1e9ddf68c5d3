"""Caffe's legacy net upgrades, applied to ``caffe_pb2.NetParameter`` messages.

Mirrors ``UpgradeNetAsNeeded`` in BVLC Caffe's ``src/caffe/util/upgrade_proto.cpp`` step by step
and in the same order:

1. V0 -> V1 (``layers { layer { ... } }``): separate ``padding`` layers are folded into the
   convolution/pooling that reads them, then every V0 field moves to its ``*_param``.
2. Data transformation: ``scale``/``mean_file``/``crop_size``/``mirror`` of V1 Data, ImageData and
   WindowData layers move to ``transform_param``.
3. V1 -> V2 (``layers { type: CONVOLUTION }``): enum types become strings, ``blobs_lr``,
   ``weight_decay``, ``param`` names and ``blob_share_mode`` become ``param { ... }`` entries.
4. Input: ``input``/``input_dim``/``input_shape`` become an ``Input`` layer placed first.
5. BatchNorm: a BatchNorm layer that declares exactly three ``param`` entries gets
   ``lr_mult: 0`` and ``decay_mult: 0`` on each (BVLC master; the older Caffe 1.0 release cleared
   the entries instead), because Caffe refuses to learn the BN statistics.

Where Caffe only logs a problem and carries on with a silently different net, we raise
``ValueError`` naming the source, the layer and the fix: a surgery tool must not guess.
"""

from __future__ import annotations

from collections.abc import Callable

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from surgery._proto import caffe_pb2
from surgery.layers import _is_repeated

__all__ = [
    "V0_TYPE_TO_V1",
    "V1_TYPE_TO_V2",
    "fold_v0_padding",
    "needs_upgrade",
    "upgrade_batchnorm",
    "upgrade_data_transform",
    "upgrade_input",
    "upgrade_net",
    "upgrade_v0_to_v1",
    "upgrade_v1_to_v2",
]

# UpgradeV1LayerType: V1LayerParameter.LayerType enum name -> V2 type string.
V1_TYPE_TO_V2: dict[str, str] = {
    "NONE": "",
    "ABSVAL": "AbsVal",
    "ACCURACY": "Accuracy",
    "ARGMAX": "ArgMax",
    "BNLL": "BNLL",
    "CONCAT": "Concat",
    "CONTRASTIVE_LOSS": "ContrastiveLoss",
    "CONVOLUTION": "Convolution",
    "DECONVOLUTION": "Deconvolution",
    "DATA": "Data",
    "DROPOUT": "Dropout",
    "DUMMY_DATA": "DummyData",
    "EUCLIDEAN_LOSS": "EuclideanLoss",
    "ELTWISE": "Eltwise",
    "EXP": "Exp",
    "FLATTEN": "Flatten",
    "HDF5_DATA": "HDF5Data",
    "HDF5_OUTPUT": "HDF5Output",
    "HINGE_LOSS": "HingeLoss",
    "IM2COL": "Im2col",
    "IMAGE_DATA": "ImageData",
    "INFOGAIN_LOSS": "InfogainLoss",
    "INNER_PRODUCT": "InnerProduct",
    "LRN": "LRN",
    "MEMORY_DATA": "MemoryData",
    "MULTINOMIAL_LOGISTIC_LOSS": "MultinomialLogisticLoss",
    "MVN": "MVN",
    "POOLING": "Pooling",
    "POWER": "Power",
    "RELU": "ReLU",
    "SIGMOID": "Sigmoid",
    "SIGMOID_CROSS_ENTROPY_LOSS": "SigmoidCrossEntropyLoss",
    "SILENCE": "Silence",
    "SOFTMAX": "Softmax",
    "SOFTMAX_LOSS": "SoftmaxWithLoss",
    "SPLIT": "Split",
    "SLICE": "Slice",
    "TANH": "TanH",
    "WINDOW_DATA": "WindowData",
    "THRESHOLD": "Threshold",
}

# UpgradeV0LayerType: V0 type string -> V1LayerParameter.LayerType enum name.
V0_TYPE_TO_V1: dict[str, str] = {
    "accuracy": "ACCURACY",
    "bnll": "BNLL",
    "concat": "CONCAT",
    "conv": "CONVOLUTION",
    "data": "DATA",
    "dropout": "DROPOUT",
    "euclidean_loss": "EUCLIDEAN_LOSS",
    "flatten": "FLATTEN",
    "hdf5_data": "HDF5_DATA",
    "hdf5_output": "HDF5_OUTPUT",
    "im2col": "IM2COL",
    "images": "IMAGE_DATA",
    "infogain_loss": "INFOGAIN_LOSS",
    "innerproduct": "INNER_PRODUCT",
    "lrn": "LRN",
    "multinomial_logistic_loss": "MULTINOMIAL_LOGISTIC_LOSS",
    "pool": "POOLING",
    "relu": "RELU",
    "sigmoid": "SIGMOID",
    "softmax": "SOFTMAX",
    "softmax_loss": "SOFTMAX_LOSS",
    "split": "SPLIT",
    "tanh": "TANH",
    "window_data": "WINDOW_DATA",
}

# UpgradeV0LayerParameter: V0 field -> {V0 type: (V1 *_param field, its sub-field)}. A sub-field
# of None copies the whole message. Caffe logs "Unknown parameter X for layer type Y" and drops
# the value for any other type; we refuse instead.
_V0_TYPED_FIELDS: dict[str, dict[str, tuple[str, str | None]]] = {
    "num_output": {
        "conv": ("convolution_param", "num_output"),
        "innerproduct": ("inner_product_param", "num_output"),
    },
    "biasterm": {
        "conv": ("convolution_param", "bias_term"),
        "innerproduct": ("inner_product_param", "bias_term"),
    },
    "weight_filler": {
        "conv": ("convolution_param", "weight_filler"),
        "innerproduct": ("inner_product_param", "weight_filler"),
    },
    "bias_filler": {
        "conv": ("convolution_param", "bias_filler"),
        "innerproduct": ("inner_product_param", "bias_filler"),
    },
    "pad": {"conv": ("convolution_param", "pad"), "pool": ("pooling_param", "pad")},
    "kernelsize": {
        "conv": ("convolution_param", "kernel_size"),
        "pool": ("pooling_param", "kernel_size"),
    },
    "group": {"conv": ("convolution_param", "group")},
    "stride": {"conv": ("convolution_param", "stride"), "pool": ("pooling_param", "stride")},
    "pool": {"pool": ("pooling_param", "pool")},
    "dropout_ratio": {"dropout": ("dropout_param", "dropout_ratio")},
    "local_size": {"lrn": ("lrn_param", "local_size")},
    "alpha": {"lrn": ("lrn_param", "alpha")},
    "beta": {"lrn": ("lrn_param", "beta")},
    "k": {"lrn": ("lrn_param", "k")},
    "source": {
        "data": ("data_param", "source"),
        "hdf5_data": ("hdf5_data_param", "source"),
        "images": ("image_data_param", "source"),
        "window_data": ("window_data_param", "source"),
        "infogain_loss": ("infogain_loss_param", "source"),
    },
    "batchsize": {
        "data": ("data_param", "batch_size"),
        "hdf5_data": ("hdf5_data_param", "batch_size"),
        "images": ("image_data_param", "batch_size"),
        "window_data": ("window_data_param", "batch_size"),
    },
    "rand_skip": {
        "data": ("data_param", "rand_skip"),
        "images": ("image_data_param", "rand_skip"),
    },
    "shuffle_images": {"images": ("image_data_param", "shuffle")},
    "new_height": {"images": ("image_data_param", "new_height")},
    "new_width": {"images": ("image_data_param", "new_width")},
    "concat_dim": {"concat": ("concat_param", "concat_dim")},
    "det_fg_threshold": {"window_data": ("window_data_param", "fg_threshold")},
    "det_bg_threshold": {"window_data": ("window_data_param", "bg_threshold")},
    "det_fg_fraction": {"window_data": ("window_data_param", "fg_fraction")},
    "det_context_pad": {"window_data": ("window_data_param", "context_pad")},
    "det_crop_mode": {"window_data": ("window_data_param", "crop_mode")},
    "hdf5_output_param": {"hdf5_output": ("hdf5_output_param", None)},
}

# V0 fields that Caffe moves to transform_param whatever the layer type.
_V0_TRANSFORM_FIELDS: dict[str, str] = {
    "scale": "scale",
    "meanfile": "mean_file",
    "cropsize": "crop_size",
    "mirror": "mirror",
}

# V0 fields UpgradeV0LayerParameter reads itself, or (new_num, new_channels) silently ignores.
_V0_OTHER_FIELDS = frozenset(
    {"name", "type", "blobs", "blobs_lr", "weight_decay", "new_num", "new_channels"}
)

# V1 layer types whose legacy data-transformation fields move to transform_param, with the
# *_param that holds them (NetNeedsDataUpgrade / UpgradeNetDataTransformation).
_DATA_TRANSFORM_PARAMS: dict[str, str] = {
    "DATA": "data_param",
    "IMAGE_DATA": "image_data_param",
    "WINDOW_DATA": "window_data_param",
}
_TRANSFORM_FIELDS = ("scale", "mean_file", "crop_size", "mirror")

# V1LayerParameter fields UpgradeV1LayerParameter handles one by one; every other set field
# (the *_param messages, and fork fields) is copied to the LayerParameter field of the same name.
_V1_SPECIAL_FIELDS = frozenset(
    {
        "bottom",
        "top",
        "name",
        "include",
        "exclude",
        "type",
        "blobs",
        "param",
        "blob_share_mode",
        "blobs_lr",
        "weight_decay",
        "loss_weight",
        "layer",
    }
)

# UpgradeV0Net keeps only these NetParameter fields; everything else is dropped.
_V0_NET_KEPT_FIELDS = frozenset({"name", "layers", "input", "input_dim", "force_backward"})


def _v1_type_name(value: int) -> str:
    try:
        return caffe_pb2.V1LayerParameter.LayerType.Name(value)
    except ValueError:
        return str(value)


def _layer_label(index: int, name: str) -> str:
    return f"'{name}'" if name else f"#{index} (unnamed)"


def _check_not_mixed(net: caffe_pb2.NetParameter, source: str) -> None:
    if len(net.layer) and len(net.layers):
        raise ValueError(
            f"{source}: the net mixes 'layer' and 'layers' ({len(net.layer)} V2 'layer' and "
            f"{len(net.layers)} legacy V0/V1 'layers' entries); Caffe would drop the 'layer' "
            "entries when upgrading. Write every layer in one format, preferably "
            "'layer { ... }' with string types."
        )


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")


# --------------------------------------------------------------------------- V0 -> V1


def _needs_v0_to_v1(net: caffe_pb2.NetParameter) -> bool:
    return any(layer.HasField("layer") for layer in net.layers)


def fold_v0_padding(net: caffe_pb2.NetParameter, source: str = "<net>") -> list[str]:
    """Fold V0 ``padding`` layers into the convolution or pooling that reads them, in place.

    This is Caffe's ``UpgradeV0PaddingLayers``: a padding layer is dropped, its ``pad`` is set
    on each consumer (which must be a ``conv`` or ``pool`` with a single bottom), and the
    consumer reads the padding layer's own bottom instead. The net stays in V0 format.

    Args:
        net: A net with V0 layers (``layers { layer { ... } }``); modified in place.
        source: File name (or other label) used in notes and errors.

    Returns:
        One note if any padding layer was folded, else an empty list.

    Raises:
        ValueError: A bottom names a blob nothing produced, or a padding layer feeds anything
            but a single-bottom convolution/pooling, or has other than one bottom and one top.
    """
    original = list(net.layers)
    kept: list[caffe_pb2.V1LayerParameter] = []
    folded: list[str] = []
    # Blob name -> index in `original` of its latest producer; -1 for net inputs.
    last_top: dict[str, int] = {name: -1 for name in net.input}
    for i, connection in enumerate(original):
        v0 = connection.layer
        label = _layer_label(i, v0.name)
        current: caffe_pb2.V1LayerParameter | None = None
        if v0.type != "padding":
            current = caffe_pb2.V1LayerParameter()
            current.CopyFrom(connection)
            kept.append(current)
        for j, blob in enumerate(connection.bottom):
            if blob not in last_top:
                raise ValueError(
                    f"{source}: V0 layer {label} reads bottom '{blob}', which no earlier layer "
                    "or net input produces; fix the bottom name or the layer order."
                )
            source_index = last_top[blob]
            if source_index == -1:
                continue
            pad_layer = original[source_index]
            if pad_layer.layer.type != "padding":
                continue
            pad_label = _layer_label(source_index, pad_layer.layer.name)
            if v0.type not in ("conv", "pool"):
                raise ValueError(
                    f"{source}: V0 padding layer {pad_label} feeds layer {label} of type "
                    f"'{v0.type}'; Caffe can only fold padding into a 'conv' or 'pool' layer. "
                    f"Set 'pad' on a convolution/pooling instead of using {pad_label}."
                )
            if len(connection.bottom) != 1:
                raise ValueError(
                    f"{source}: V0 layer {label} takes padding layer {pad_label}'s output but "
                    f"has {len(connection.bottom)} bottoms; a padded conv/pool takes exactly one."
                )
            if len(pad_layer.bottom) != 1 or len(pad_layer.top) != 1:
                raise ValueError(
                    f"{source}: V0 padding layer {pad_label} has {len(pad_layer.bottom)} bottoms "
                    f"and {len(pad_layer.top)} tops; Caffe can only fold a padding layer with "
                    "exactly one of each."
                )
            # Caffe writes into the last layer kept so far, which is `current` here since a
            # padding layer itself was rejected above.
            assert current is not None
            current.layer.pad = pad_layer.layer.pad
            current.bottom[j] = pad_layer.bottom[0]
            if pad_layer.layer.name not in folded:
                folded.append(pad_layer.layer.name)
        for blob in connection.top:
            last_top[blob] = i
    dropped = [c.layer.name for c in original if c.layer.type == "padding"]
    del net.layers[:]
    net.layers.extend(kept)
    if not dropped:
        return []
    note = (
        f"V0 -> V1: folded {_plural(len(dropped), 'padding layer')} ({', '.join(dropped)}) "
        "into the next convolution/pooling"
    )
    unused = [name for name in dropped if name not in folded]
    if unused:
        note += f"; {', '.join(unused)} fed no layer and were dropped"
    return [note]


def _set_field(target: Message, field: str, value: object) -> None:
    descriptor = target.DESCRIPTOR.fields_by_name[field]
    if _is_repeated(descriptor):
        getattr(target, field).append(value)
    elif descriptor.type == FieldDescriptor.TYPE_MESSAGE:
        assert isinstance(value, Message)
        getattr(target, field).CopyFrom(value)
    elif descriptor.type == FieldDescriptor.TYPE_ENUM:
        # V0's PoolMethod and PoolingParameter's share names, not necessarily numbers.
        source_enum = caffe_pb2.V0LayerParameter.PoolMethod.Name(value)
        setattr(target, field, descriptor.enum_type.values_by_name[source_enum].number)
    else:
        setattr(target, field, value)


def _upgrade_v0_layer(
    connection: caffe_pb2.V1LayerParameter, index: int, source: str
) -> tuple[caffe_pb2.V1LayerParameter, list[str]]:
    out = caffe_pb2.V1LayerParameter()
    out.bottom.extend(connection.bottom)
    out.top.extend(connection.top)
    ignored: list[str] = []
    if not connection.HasField("layer"):
        return out, ignored
    v0 = connection.layer
    label = _layer_label(index, v0.name)
    if v0.HasField("name"):
        out.name = v0.name
    kind = v0.type
    if v0.HasField("type"):
        if kind not in V0_TYPE_TO_V1:
            raise ValueError(
                f"{source}: V0 layer {label} has unknown type '{kind}'; Caffe's V0 upgrade "
                f"knows only {', '.join(sorted(V0_TYPE_TO_V1))}. Rewrite it as a V2 layer."
            )
        out.type = caffe_pb2.V1LayerParameter.LayerType.Value(V0_TYPE_TO_V1[kind])
    out.blobs.extend(v0.blobs)
    out.blobs_lr.extend(v0.blobs_lr)
    out.weight_decay.extend(v0.weight_decay)
    for descriptor, value in v0.ListFields():
        field = descriptor.name
        if field in _V0_OTHER_FIELDS:
            if field in ("new_num", "new_channels"):
                ignored.append(f"{v0.name}.{field}")
            continue
        if field in _V0_TRANSFORM_FIELDS:
            _set_field(out.transform_param, _V0_TRANSFORM_FIELDS[field], value)
            continue
        targets = _V0_TYPED_FIELDS.get(field)
        if targets is None:
            ignored.append(f"{v0.name}.{field}")
            continue
        if kind not in targets:
            allowed = ", ".join(f"'{t}'" for t in targets)
            raise ValueError(
                f"{source}: V0 layer {label} of type '{kind}' sets '{field}', which Caffe's V0 "
                f"upgrade only maps for type {allowed} (Caffe would drop it silently); remove "
                "the field or fix the layer type."
            )
        param_field, sub_field = targets[kind]
        if sub_field is None:
            getattr(out, param_field).CopyFrom(value)
        else:
            _set_field(getattr(out, param_field), sub_field, value)
    return out, ignored


def upgrade_v0_to_v1(net: caffe_pb2.NetParameter, source: str = "<net>") -> list[str]:
    """Upgrade a V0 net (``layers { layer { ... } }``) to V1 in place (Caffe's ``UpgradeV0Net``).

    Padding layers are folded first (:func:`fold_v0_padding`); then each V0 layer becomes a V1
    layer with an enum type and its fields moved into ``*_param`` / ``transform_param``. As in
    Caffe, only the net's ``name``, ``input``, ``input_dim`` and ``force_backward`` survive.

    Args:
        net: The net; modified in place. A net without V0 layers is left unchanged.
        source: File name (or other label) used in notes and errors.

    Returns:
        Notes on what was upgraded; empty when nothing needed it.

    Raises:
        ValueError: The net mixes ``layer`` and ``layers``; a padding layer cannot be folded;
            a V0 layer has an unknown type or a field its type does not take.
    """
    _check_not_mixed(net, source)
    if not _needs_v0_to_v1(net):
        return []
    notes = fold_v0_padding(net, source)
    layers: list[caffe_pb2.V1LayerParameter] = []
    ignored: list[str] = []
    for i, connection in enumerate(net.layers):
        upgraded, dropped = _upgrade_v0_layer(connection, i, source)
        layers.append(upgraded)
        ignored.extend(dropped)
    dropped_net = [d.name for d, _ in net.ListFields() if d.name not in _V0_NET_KEPT_FIELDS]
    for field in dropped_net:
        net.ClearField(field)
    del net.layers[:]
    net.layers.extend(layers)
    note = f"V0 -> V1: {_plural(len(layers), 'V0 layer')} converted to V1 'layers'"
    if ignored:
        note += f"; ignored fields Caffe does not upgrade: {', '.join(ignored)}"
    if dropped_net:
        note += f"; dropped net fields Caffe's V0 upgrade does not keep: {', '.join(dropped_net)}"
    notes.append(note)
    return notes


# --------------------------------------------------------------------------- data transform


def upgrade_data_transform(net: caffe_pb2.NetParameter, source: str = "<net>") -> list[str]:
    """Move legacy data-transformation fields to ``transform_param``, in place.

    Caffe's ``UpgradeNetDataTransformation``: for V1 ``DATA``, ``IMAGE_DATA`` and
    ``WINDOW_DATA`` layers, ``scale``, ``mean_file``, ``crop_size`` and ``mirror`` leave their
    ``*_param`` for ``transform_param``. Only V1 ``layers`` are looked at, as in Caffe.

    Args:
        net: The net; modified in place.
        source: File name (or other label) used in notes.

    Returns:
        One note naming the layers changed, or an empty list.
    """
    del source  # Nothing here can fail; kept so every step has the same signature.
    changed: list[str] = []
    for layer in net.layers:
        param_name = _DATA_TRANSFORM_PARAMS.get(_v1_type_name(layer.type))
        if param_name is None or not layer.HasField(param_name):
            continue
        param = getattr(layer, param_name)
        moved = False
        for field in _TRANSFORM_FIELDS:
            if param.HasField(field):
                setattr(layer.transform_param, field, getattr(param, field))
                param.ClearField(field)
                moved = True
        if moved:
            changed.append(layer.name)
    if not changed:
        return []
    return [
        "data transformation fields (scale/mean_file/crop_size/mirror) -> transform_param "
        f"in {', '.join(repr(n) for n in changed)}"
    ]


# --------------------------------------------------------------------------- V1 -> V2


def _upgrade_v1_layer(
    v1: caffe_pb2.V1LayerParameter, index: int, source: str
) -> caffe_pb2.LayerParameter:
    label = _layer_label(index, v1.name)
    if v1.HasField("layer"):
        raise ValueError(
            f"{source}: layer {label} still holds a V0 'layer {{ ... }}' block; upgrade the "
            "net from V0 first (upgrade_net does) or remove the block."
        )
    out = caffe_pb2.LayerParameter()
    out.bottom.extend(v1.bottom)
    out.top.extend(v1.top)
    if v1.HasField("name"):
        out.name = v1.name
    out.include.extend(v1.include)
    out.exclude.extend(v1.exclude)
    if v1.HasField("type"):
        enum_name = _v1_type_name(v1.type)
        if enum_name not in V1_TYPE_TO_V2:
            raise ValueError(
                f"{source}: V1 layer {label} has type {enum_name}, which Caffe's V1 upgrade does "
                "not know; rewrite the layer as 'layer { type: \"...\" }' with the V2 type name."
            )
        out.type = V1_TYPE_TO_V2[enum_name]
    out.blobs.extend(v1.blobs)

    def param(i: int) -> caffe_pb2.ParamSpec:
        # Caffe grows the param list to cover the longest of the four legacy lists.
        while len(out.param) <= i:
            out.param.add()
        return out.param[i]

    for i, name in enumerate(v1.param):
        param(i).name = name
    for i, mode in enumerate(v1.blob_share_mode):
        mode_name = caffe_pb2.V1LayerParameter.DimCheckMode.Name(mode)
        param(i).share_mode = caffe_pb2.ParamSpec.DimCheckMode.Value(mode_name)
    for i, lr in enumerate(v1.blobs_lr):
        param(i).lr_mult = lr
    for i, decay in enumerate(v1.weight_decay):
        param(i).decay_mult = decay
    out.loss_weight.extend(v1.loss_weight)

    v2_fields = caffe_pb2.LayerParameter.DESCRIPTOR.fields_by_name
    for descriptor, value in v1.ListFields():
        if descriptor.name in _V1_SPECIAL_FIELDS:
            continue
        target = v2_fields.get(descriptor.name)
        compatible = (
            target is not None
            and target.type == descriptor.type
            and _is_repeated(target) == _is_repeated(descriptor)
            and (
                descriptor.type != FieldDescriptor.TYPE_MESSAGE
                or target.message_type.full_name == descriptor.message_type.full_name
            )
        )
        if not compatible:
            raise ValueError(
                f"{source}: V1 layer {label} sets '{descriptor.name}', which has no counterpart "
                "of the same type in the V2 LayerParameter; rewrite the layer in V2 format."
            )
        if _is_repeated(descriptor):
            getattr(out, descriptor.name).extend(value)
        elif descriptor.type == FieldDescriptor.TYPE_MESSAGE:
            getattr(out, descriptor.name).CopyFrom(value)
        else:
            setattr(out, descriptor.name, value)
    return out


def upgrade_v1_to_v2(net: caffe_pb2.NetParameter, source: str = "<net>") -> list[str]:
    """Convert V1 ``layers`` to V2 ``layer`` entries in place (Caffe's ``UpgradeV1Net``).

    Enum types become strings (:data:`V1_TYPE_TO_V2`); ``param`` names, ``blob_share_mode``,
    ``blobs_lr`` and ``weight_decay`` become ``param { name share_mode lr_mult decay_mult }``;
    include/exclude, blobs, ``loss_weight`` and every ``*_param`` are copied. The net's other
    fields (``input``, ``input_dim``, ``state`` ...) are kept.

    Args:
        net: The net; modified in place. A net without ``layers`` is left unchanged.
        source: File name (or other label) used in notes and errors.

    Returns:
        One note, or an empty list when there were no V1 layers.

    Raises:
        ValueError: The net mixes ``layer`` and ``layers``; a layer has a type outside
            :data:`V1_TYPE_TO_V2`, a V0 block, or a field the V2 layer cannot hold.
    """
    _check_not_mixed(net, source)
    if not len(net.layers):
        return []
    layers = [_upgrade_v1_layer(v1, i, source) for i, v1 in enumerate(net.layers)]
    converted = []
    if any(len(v1.blobs_lr) or len(v1.weight_decay) for v1 in net.layers):
        converted.append("blobs_lr/weight_decay -> param")
    if any(len(v1.param) or len(v1.blob_share_mode) for v1 in net.layers):
        converted.append("param names/blob_share_mode -> param")
    del net.layers[:]
    net.layer.extend(layers)
    detail = "; ".join([_plural(len(layers), "layer"), *converted])
    return [f"V1 -> V2: 'layers' converted to 'layer' ({detail})"]


# --------------------------------------------------------------------------- input


def upgrade_input(net: caffe_pb2.NetParameter, source: str = "<net>") -> list[str]:
    """Turn ``input``/``input_dim``/``input_shape`` into an ``Input`` layer, in place.

    Caffe's ``UpgradeNetInput``: an ``Input`` layer named ``input`` with one top and one shape
    per input (from ``input_shape``, else four ``input_dim`` values each) goes first in the net.
    Inputs with no shape at all (legacy caffemodels) are simply removed.

    Args:
        net: The net; modified in place.
        source: File name (or other label) used in notes and errors.

    Returns:
        One note, or an empty list when the net has no legacy input fields.

    Raises:
        ValueError: The net mixes ``layer`` and ``layers``; or there are fewer
            ``input_shape`` entries than inputs, or ``input_dim`` is not 4 per input.
    """
    _check_not_mixed(net, source)
    if not len(net.input):
        # Caffe's NetNeedsInputUpgrade looks at `input` only; stray dims without names would
        # make a zero-top Input layer, so they are left for the net check to report.
        return []
    if len(net.layers):
        raise ValueError(
            f"{source}: cannot add an Input layer to a net still in V1 'layers' format; run "
            "upgrade_v1_to_v2 first (upgrade_net does)."
        )
    names = list(net.input)
    has_shape = len(net.input_shape) > 0
    has_dim = len(net.input_dim) > 0
    note: str
    if has_shape or has_dim:
        layer = caffe_pb2.LayerParameter(name="input", type="Input")
        shapes: list[list[int]] = []
        if has_shape:
            if len(net.input_shape) < len(names):
                raise ValueError(
                    f"{source}: {len(names)} inputs ({', '.join(names)}) but only "
                    f"{len(net.input_shape)} input_shape entries; give one input_shape per input."
                )
            shapes = [list(shape.dim) for shape in net.input_shape[: len(names)]]
        else:
            if len(net.input_dim) < 4 * len(names):
                raise ValueError(
                    f"{source}: {len(names)} inputs ({', '.join(names)}) need "
                    f"{4 * len(names)} input_dim values (N, C, H, W each), found "
                    f"{len(net.input_dim)}; use input_shape {{ dim: ... }} for other ranks."
                )
            dims = list(net.input_dim)
            shapes = [dims[4 * i : 4 * i + 4] for i in range(len(names))]
        layer.top.extend(names)
        for dims_of_one in shapes:
            layer.input_param.shape.add().dim.extend(dims_of_one)
        fields = "input/input_shape" if has_shape else "input/input_dim"
        described = ", ".join(
            f"{name} {'x'.join(str(d) for d in dims_of_one)}"
            for name, dims_of_one in zip(names, shapes, strict=True)
        )
        existing = list(net.layer)
        del net.layer[:]
        net.layer.extend([layer, *existing])
        note = f"{fields} -> Input layer 'input' placed first ({described})"
    else:
        note = f"input {', '.join(names)} without shape removed (legacy caffemodel input field)"
    net.ClearField("input")
    net.ClearField("input_shape")
    net.ClearField("input_dim")
    return [note]


# --------------------------------------------------------------------------- BatchNorm


def _batchnorm_needs_fix(layer: caffe_pb2.LayerParameter) -> bool:
    return layer.type == "BatchNorm" and len(layer.param) == 3


def _param_is_frozen(spec: caffe_pb2.ParamSpec) -> bool:
    return (
        spec.HasField("lr_mult")
        and spec.lr_mult == 0
        and spec.HasField("decay_mult")
        and spec.decay_mult == 0
    )


def upgrade_batchnorm(net: caffe_pb2.NetParameter, source: str = "<net>") -> list[str]:
    """Force ``lr_mult: 0`` and ``decay_mult: 0`` on BatchNorm params, in place.

    BVLC master's ``UpgradeNetBatchNorm``: a ``BatchNorm`` layer that declares exactly three
    ``param`` entries (the old definition) gets ``lr_mult`` and ``decay_mult`` set to 0 on each;
    names and share modes stay. Other BatchNorm layers are untouched. (Caffe 1.0's first release
    removed the entries instead; master keeps them, and so do we.)

    Args:
        net: The net; modified in place.
        source: File name (or other label), unused: nothing here can fail.

    Returns:
        One note per BatchNorm layer whose params changed; entries already explicitly
        ``lr_mult: 0 decay_mult: 0`` are not reported.
    """
    del source
    notes: list[str] = []
    for layer in net.layer:
        if not _batchnorm_needs_fix(layer):
            continue
        if all(_param_is_frozen(spec) for spec in layer.param):
            continue
        before = ", ".join(
            f"{spec.lr_mult:g}/{spec.decay_mult:g}" if spec.ListFields() else "default"
            for spec in layer.param
        )
        for spec in layer.param:
            spec.lr_mult = 0.0
            spec.decay_mult = 0.0
        notes.append(
            f"BatchNorm '{layer.name}': param lr_mult and decay_mult forced to 0 (were "
            f"lr/decay {before}; Caffe ignores learning of BN statistics)"
        )
    return notes


# --------------------------------------------------------------------------- whole net


def needs_upgrade(net: caffe_pb2.NetParameter) -> bool:
    """Say whether :func:`upgrade_net` would change ``net``.

    Unlike Caffe's ``NetNeedsUpgrade``, a BatchNorm layer whose three params already read
    ``lr_mult: 0 decay_mult: 0`` does not count, since upgrading it changes nothing.

    Args:
        net: The net, not modified.

    Returns:
        True when some legacy upgrade applies.
    """
    if len(net.layers) or len(net.input):
        return True
    return any(
        _batchnorm_needs_fix(layer) and not all(_param_is_frozen(s) for s in layer.param)
        for layer in net.layer
    )


_STEPS: tuple[Callable[[caffe_pb2.NetParameter, str], list[str]], ...] = (
    upgrade_v0_to_v1,
    upgrade_data_transform,
    upgrade_v1_to_v2,
    upgrade_input,
    upgrade_batchnorm,
)


def upgrade_net(net: caffe_pb2.NetParameter, source: str = "<net>") -> list[str]:
    """Upgrade a legacy net to the current (V2) format in place, as Caffe does on every read.

    Applies, in Caffe's order, V0 -> V1 (with padding folding), the data-transformation upgrade,
    V1 -> V2, the input upgrade and the BatchNorm upgrade. A current net is left unchanged.

    Args:
        net: The net; modified in place.
        source: File name (or other label) used in notes and errors.

    Returns:
        Human-readable notes, one per upgrade applied; empty for a net already current.

    Raises:
        ValueError: The net mixes ``layer`` and ``layers``, or a legacy construct cannot be
            upgraded (the message names the source, the layer and the fix).
    """
    _check_not_mixed(net, source)
    notes: list[str] = []
    for step in _STEPS:
        notes.extend(step(net, source))
    return notes
