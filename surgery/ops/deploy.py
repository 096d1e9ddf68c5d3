"""From a training definition to an inference one: ``to_deploy`` and ``fc_to_conv``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import NetError, ShapeMismatchError, SurgeryError
from ..layers import attr, is_data, is_loss
from ..net import Layer, Net, NetState, freeze_array
from . import _common as C
from .report import Report

__all__ = ["to_deploy", "fc_to_conv"]

_DROP_TYPES = ("Accuracy", "Silence")
# Loss -> the inference layer that gives its probabilities.
_LOSS_TO_PROB = {"SoftmaxWithLoss": "Softmax", "SigmoidCrossEntropyLoss": "Sigmoid"}


def _missing(flow: Any, lay: Layer) -> str:
    """What the data layer does not say (for the error message)."""
    return (
        "its batch_size, crop_size (or new_height/new_width) and channel count (one mean_value "
        "per channel, or loaded first-convolution weights) are not all in the definition"
    )


def _read_for_inference(net: Net, blob: str) -> bool:
    """Whether ``blob`` (a data layer's extra top) feeds a learnable layer through layers
    other than losses, Accuracy and Silence: an image such as FCN's HHA channels, not a label
    (a label only reaches losses, or layers that copy it)."""
    from ..layers import LEARNABLE_TYPES

    frontier, seen = [blob], {blob}
    while frontier:
        current = frontier.pop()
        for lay in net.layers:
            if current not in lay.bottoms or is_loss(lay) or is_data(lay):
                continue
            if lay.type in _DROP_TYPES:
                continue
            if lay.type in LEARNABLE_TYPES:
                return True
            for top in lay.tops:
                if top not in seen:
                    seen.add(top)
                    frontier.append(top)
    return False


def _root_producer(value: Any) -> Layer:
    """The layer that first made ``value``'s blob (before in-place layers)."""
    while value.version > 0:
        node = value.producer
        value = node.inputs[value.top_index]
    return value.producer.layer


def _shape_arg(shape: Any, what: str = "input_shape") -> tuple[int, ...]:
    if isinstance(shape, str):
        shape = [s for s in shape.replace("x", ",").split(",") if s.strip()]
    try:
        dims = tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        raise SurgeryError(f"{what} must be N,C,H,W (positive integers); got {shape!r}") from None
    if not dims or any(d <= 0 for d in dims):
        raise SurgeryError(f"{what} must be N,C,H,W (positive integers); got {shape!r}")
    return dims


def _loss_weight(lay: Layer) -> float:
    """The weight of a loss layer's first top (Caffe: 1 unless ``loss_weight`` says)."""
    w = lay.extra.get("loss_weight")
    if isinstance(w, (list, tuple)):
        w = w[0] if w else None
    return 1.0 if w is None else float(w)


def _aux_layers(flow: Any, heads: list[Layer]) -> tuple[set[int], list[Layer]]:
    """Rule 5: (ids of the layers that only feed auxiliary heads, the auxiliary heads).

    An auxiliary head is a loss with a ``loss_weight`` below the largest one among the heads
    (GoogLeNet's 0.3 against 1). Everything the other heads, and every output that is not a
    loss or an Accuracy, need is kept; the rest of the TEST view only feeds the auxiliary
    losses and the Accuracy layers.
    """
    if len(heads) < 2:
        return set(), []
    top = max(_loss_weight(h) for h in heads)
    aux = [h for h in heads if _loss_weight(h) < top]
    if not aux:
        return set(), []
    aux_ids = {id(h) for h in aux}
    roots = [n for n in flow.nodes if is_loss(n.layer) and id(n.layer) not in aux_ids
             and any(n.layer is h for h in heads)]
    for v in flow.outputs:
        lay = v.producer.layer
        if not is_loss(lay) and lay.type not in _DROP_TYPES:
            roots.append(v.producer)
    keep: set[int] = set()
    for r in roots:
        keep.update(id(n.layer) for n in flow.ancestors(r))
    feeding: set[int] = set()
    for n in flow.nodes:
        if id(n.layer) in aux_ids:
            feeding.update(id(a.layer) for a in flow.ancestors(n))
    drop = {id(n.layer) for n in flow.nodes
            if id(n.layer) in feeding and id(n.layer) not in keep and not is_data(n.layer)
            and n.layer.type != "Input"}
    return drop, aux


def to_deploy(
    net: Net,
    input_shape: Sequence[int] | Mapping[str, Sequence[int]] | str | None = None,
    *,
    keep_aux: bool = False,
) -> tuple[Net, Report]:
    """The inference (deploy) definition of a train_val net.

    Rules:

    1. Start from the TEST view: layers excluded from TEST are dropped, include/exclude rules
       are removed from the rest, the net-level ``state`` is removed.
    2. Dataset layers (``Data``, ``ImageData``, ``HDF5Data``...) are replaced by one ``Input``
       layer each, at the front, named after its first top (the data blob). Its other tops
       are kept as Input tops when they feed a learnable layer other than through a loss
       (FCN's ``color`` + ``hha``), else dropped (the labels).
    3. Each Input top's shape: ``input_shape`` (one N,C,H,W for every input, or
       ``{top: shape}``);
       else read off the data layer (:func:`surgery.ops._common.guess_input_shapes`:
       batch_size; crop_size or new_height/new_width; channels from the first Convolution's
       loaded weights, or the mean_value count). If it cannot be told, an error asks for
       ``input_shape``.
    4. Loss layers, ``Accuracy`` and ``Silence`` are dropped. A ``SoftmaxWithLoss`` becomes a
       ``Softmax`` (``SigmoidCrossEntropyLoss`` a ``Sigmoid``) on its first bottom, keeping
       ``softmax_param``; its top and name are ``prob`` for a single head, else
       ``<bottom>/prob`` (e.g. ``loss1/classifier/prob``).
    5. Auxiliary heads are dropped with the branches that only feed them (unless
       ``keep_aux``): a loss whose ``loss_weight`` is below the largest among the heads
       (GoogLeNet's ``loss1``/``loss2`` at 0.3 against ``loss3`` at 1) is a training aid, and
       every layer that feeds only such losses and Accuracy layers goes with it (GoogLeNet's
       ``loss1/ave_pool`` ... ``loss1/classifier``), reported. What the main head and any
       non-loss output need is kept. The result then has one Softmax ``prob``, as the
       published ``deploy.prototxt``.
    6. Any other layer reading a dropped blob (a label) is dropped too, and reported.
    7. Learnable layers keep their weights (the same arrays) and param specs.
    8. The result passes :func:`surgery.check.check`.

    Args:
        net: a train_val (or any) net; not modified.
        input_shape: N,C,H,W as a sequence or "N,C,H,W" string, or ``{data top: shape}``.
        keep_aux: keep auxiliary heads (rule 5), each with its own Softmax.

    Returns:
        ``(deploy net, report)``; ``report.data["aux_dropped"]`` lists the dropped heads.

    Raises:
        SurgeryError: no input shape can be determined, or a bad ``input_shape``.
        NetError: the TEST net does not resolve, or the result is invalid.
    """
    report = Report("to_deploy")
    state = NetState("TEST")
    shapes_given: dict[str, tuple[int, ...]] = {}
    one_shape: tuple[int, ...] | None = None
    if isinstance(input_shape, Mapping):
        shapes_given = {k: _shape_arg(v) for k, v in input_shape.items()}
    elif input_shape is not None:
        one_shape = _shape_arg(input_shape)

    test = Net(
        net.name,
        [lay for lay in net.layers if lay.is_included(state)],
        dict(net.extra),
        net.source,
        list(net.upgrades),
        net.weights_source,
    )
    dropped_phase = [lay.name for lay in net.layers if not lay.is_included(state)]
    if dropped_phase:  # rule 1
        report.change(
            None,
            f"dropped {len(dropped_phase)} layer(s) not in the TEST net: "
            + ", ".join(dropped_phase),
            layers=dropped_phase,
        )
    flow = C.flows(test, strict=False).get("TEST")
    if flow is None:
        C.flows(test, strict=True)  # raises the TEST error
        raise NetError("the TEST net does not resolve")  # pragma: no cover
    guessed = C.guess_input_shapes(flow)

    out = Net(
        net.name,
        [],
        {k: v for k, v in net.extra.items() if k != "state"},
        net.source,
        list(net.upgrades),
        net.weights_source,
    )
    if "state" in net.extra:
        report.change(None, "removed the net-level state")
    inputs: list[Layer] = []
    dead: set[str] = set()
    losses = [lay for lay in test.layers if is_loss(lay)]
    heads = [lay for lay in losses if lay.type in _LOSS_TO_PROB and lay.bottoms]
    aux_drop, aux = (set(), []) if keep_aux else _aux_layers(flow, heads)
    if aux:  # rule 5
        aux_names = [lay.name for lay in test.layers if id(lay) in aux_drop]
        report.change(None, f"dropped {len(aux)} auxiliary head(s) "
                      f"({', '.join(h.name for h in aux)}: loss_weight "
                      f"{', '.join(f'{_loss_weight(h):g}' for h in aux)}) and the "
                      f"{len(aux_names)} layer(s) that only feed them: {', '.join(aux_names)}; "
                      "--keep-aux keeps them", layers=aux_names)
        heads = [h for h in heads if not any(h is a for a in aux)]
    report.data["aux_dropped"] = [h.name for h in aux]
    body: list[Layer] = []
    for lay in test.layers:
        if id(lay) in aux_drop:
            dead.update(t for t in lay.tops if t not in lay.bottoms)
            continue
        if is_data(lay):  # rules 2-3
            if not lay.tops:
                continue
            kept = [lay.tops[0]] + [t for t in lay.tops[1:] if _read_for_inference(test, t)]
            labels = [t for t in lay.tops if t not in kept]
            dims = []
            for top in kept:
                shape = shapes_given.get(top) or one_shape or guessed.get(top)
                if shape is None:
                    raise SurgeryError(
                        f"cannot tell the input shape of {top!r} (data layer {lay.name!r}, "
                        f"{lay.type}): {_missing(flow, lay)}; give --input-shape "
                        + ("N,C,H,W" if len(kept) == 1 else f"{top}=N,C,H,W")
                    )
                dims.append({"dim": [int(d) for d in shape]})
            inputs.append(
                Layer(
                    kept[0],
                    "Input",
                    [],
                    kept,
                    attrs={"shape": dims},
                    param_field="input_param",
                )
            )
            dead.update(labels)
            report.change(
                lay.name,
                f"{lay.type} -> Input "
                + ", ".join(f"{t!r} shape " + "x".join(map(str, d["dim"]))
                            for t, d in zip(kept, dims, strict=True))
                + (f"; dropped label top(s) {', '.join(labels)}" if labels else ""),
            )
            continue
        if lay.type in _DROP_TYPES or (is_loss(lay) and not any(lay is h for h in heads)):
            dead.update(t for t in lay.tops if t not in lay.bottoms)
            report.change(lay.name, f"dropped ({lay.type})")
            continue
        if any(lay is h for h in heads):  # rule 4
            bottom = lay.bottoms[0]
            name = "prob" if len(heads) == 1 else f"{bottom}/prob"
            name = C.unique_name(test, name)
            prob = Layer(name, _LOSS_TO_PROB[lay.type], [bottom], [name])
            if lay.type == "SoftmaxWithLoss" and lay.attrs:
                prob.attrs = dict(lay.attrs)
                prob.param_field = "softmax_param"
            elif lay.type == "SoftmaxWithLoss":
                sp = lay.extra.get("softmax_param")
                if sp:
                    prob.attrs = dict(sp)
                    prob.param_field = "softmax_param"
            body.append(prob)
            report.change(lay.name, f"{lay.type} -> {prob.type} {name!r} on {bottom!r}")
            continue
        if any(b in dead for b in lay.bottoms):  # rule 6
            dead.update(t for t in lay.tops if t not in lay.bottoms)
            report.change(
                lay.name,
                f"dropped: reads a training-only blob "
                f"({', '.join(b for b in lay.bottoms if b in dead)})",
            )
            continue
        new = lay.copy()
        new.include, new.exclude = [], []
        body.append(new)
    if not inputs and not any(lay.type == "Input" for lay in body):
        report.note("no data layer found; the net keeps its own inputs")
    out.layers = inputs + body
    ruled = sum(1 for lay in test.layers if lay.include or lay.exclude)
    if ruled:
        report.change(None, f"removed include/exclude rules from {ruled} layer(s)")
    report.data["inputs"] = {top: dims["dim"] for lay in inputs
                             for top, dims in zip(lay.tops, lay.attrs["shape"], strict=True)}
    report.data["outputs"] = [v.name for v in C.flows(out).get("TEST", flow).outputs]
    return C.finish(out, report)  # rules 7-8


def fc_to_conv(
    net: Net,
    layers: Iterable[str] | str | None = None,
    suffix: str = "-conv",
    input_shapes: Mapping[str, Sequence[int]] | None = None,
) -> tuple[Net, Report]:
    """Turn InnerProduct layers into equivalent Convolutions (a fully convolutional net).

    Caffe's net-surgery example: on CaffeNet, ``fc6`` (on ``pool5``, 256x6x6) becomes a 6x6
    Convolution ``fc6-conv``, ``fc7`` and ``fc8`` 1x1 ones; on a larger input the net then
    gives a map of class scores.

    Rules:

    1. ``layers`` (names or globs; default every InnerProduct) must be InnerProduct layers with
       ``axis: 1``.
    2. The kernel is the spatial size of the layer's bottom as inferred for the net's input
       (H x W of an N,C,H,W bottom; 1x1 for an N,K bottom). Other bottom ranks are an error.
    3. ``num_output``, ``bias_term``, fillers and ``param`` specs carry over; ``axis`` and
       ``transpose`` are dropped.
    4. The layer is renamed ``<name><suffix>`` (default ``-conv``, as in Caffe's example, so
       Caffe will not copy the old 2-D weights into it); a top named like the layer is renamed
       alike, with its in-place layers and readers. ``suffix=""`` keeps the names.
    5. Weights: (N, K) -> (N, C, H, W) in Caffe's row-major order (a view, no copy), so
       outputs are identical; with ``transpose`` the (K, N) weight is transposed first. The
       bias keeps the same array.
    6. The result passes :func:`surgery.check.check`.

    Args:
        net: the net (not modified).
        layers: names or globs of InnerProduct layers; default all of them.
        suffix: appended to converted layers' names (rule 4).
        input_shapes: shapes for dataset tops shape inference cannot know.

    Returns:
        ``(new net, report)``.

    Raises:
        LayerNotFoundError: a name or glob matches nothing.
        NetError: a layer is not an InnerProduct, has ``axis`` != 1, or its bottom shape is
            unknown; or the result is invalid.
    """
    report = Report("fc_to_conv")
    out = net.copy()
    if layers is None:
        names = list(dict.fromkeys(lay.name for lay in out.layers if lay.type == "InnerProduct"))
        if not names:
            raise NetError(f"no InnerProduct layers in {net.source or 'the net'} to convert")
    else:
        names = C.match_globs(out, layers, what="--layers")
    bottoms: dict[str, tuple[int, ...]] = {}
    bottom_names: dict[str, str] = {}
    infos = []
    for phase in ("TEST", "TRAIN"):
        try:
            infos.append(C.infer_shapes(out, phase, dict(input_shapes or {})))
        except SurgeryError:
            continue
    for name in names:  # rules 1-2
        lay = out.layer(name)
        if lay.type != "InnerProduct":
            raise NetError(
                f"layer {name!r} is a {lay.type}, not an InnerProduct; fc-to-conv "
                "converts InnerProduct layers only"
            )
        if int(attr(lay, "axis", 1)) != 1:
            raise NetError(
                f"layer {name!r} has axis {attr(lay, 'axis', 1)}; only axis 1 "
                "(flatten C,H,W) has an equivalent Convolution"
            )
        shape = None
        producer = None
        for flow, info in infos:
            node = next((n for n in flow.nodes if n.layer is lay), None)
            if node is not None and info.bottoms(node) and info.bottoms(node)[0] is not None:
                shape = tuple(info.bottoms(node)[0])
                producer = _root_producer(node.inputs[0])
                break
        if shape is None:
            raise NetError(
                f"layer {name!r}: the shape of its bottom {lay.bottoms[0]!r} is "
                "unknown; give the net an Input shape (or input_shapes)"
            )
        if len(shape) not in (2, 4):
            raise NetError(
                f"layer {name!r}: bottom {lay.bottoms[0]!r} has shape {shape}; "
                "fc-to-conv needs an N,C,H,W or N,K bottom"
            )
        if len(shape) == 2 and producer is not None and producer.name not in names:
            raise NetError(
                f"layer {name!r}: its bottom {lay.bottoms[0]!r} is 2-D {shape}, made by "
                f"{producer.name!r} ({producer.type}), which is not being converted; a "
                f"Convolution needs spatial axes: convert {producer.name!r} too "
                f"(--layers {producer.name},{name})"
            )
        bottoms[name] = shape
        bottom_names[name] = lay.bottoms[0]
    for name in names:
        shape = bottoms[name]
        c, h, w = (shape[1], 1, 1) if len(shape) == 2 else shape[1:]
        new_name = name + suffix
        if suffix and out.layers_named(new_name):
            raise NetError(
                f"cannot convert {name!r} to {new_name!r}: that name is taken; "
                "choose another suffix"
            )
        twins = out.layers_named(name)
        for lay in twins:  # rules 3, 5
            transpose = bool(lay.attrs.pop("transpose", False))
            lay.attrs.pop("axis", None)
            lay.type = "Convolution"
            lay.param_field = "convolution_param"
            kept = {k: v for k, v in lay.attrs.items()}
            lay.attrs = {"num_output": kept.pop("num_output", attr(lay, "num_output", 0))}
            if h == w:
                lay.attrs["kernel_size"] = [int(h)]
            else:
                lay.attrs["kernel_h"], lay.attrs["kernel_w"] = int(h), int(w)
            lay.attrs.update(kept)
            if lay.params and lay.params[0].data is not None:
                wdata = lay.params[0].data
                n_out = int(lay.attrs["num_output"])
                mat = wdata.reshape(-1, n_out).T if transpose else wdata.reshape(n_out, -1)
                if mat.shape[1] != c * h * w:
                    raise ShapeMismatchError(
                        f"layer {name!r}: weight has {mat.shape[1]} inputs per output but the "
                        f"bottom {lay.bottoms[0]!r} is {shape} ({c * h * w}); the weights do "
                        "not belong to this definition"
                    )
                if transpose:
                    mat = np.ascontiguousarray(mat)
                lay.params[0].data = freeze_array(mat.reshape(n_out, c, h, w))
        if suffix:  # rule 4
            lay0 = twins[0]
            for ti, top in enumerate(list(lay0.tops)):
                if top == name:
                    C.rename_top(out, lay0, ti, new_name)
            out.rename_layer(name, new_name)
        kernel = f"{h}x{w}"
        report.change(
            name,
            f"InnerProduct -> Convolution {new_name!r}, kernel {kernel} on "
            f"{bottom_names[name]!r} {'x'.join(map(str, shape))}",
            new_name=new_name,
            kernel=[int(h), int(w)],
            weight_shape=[int(lay.attrs["num_output"]), int(c), int(h), int(w)],
        )
    report.data["renamed"] = {n: n + suffix for n in names}
    return C.finish(out, report)  # rule 6
