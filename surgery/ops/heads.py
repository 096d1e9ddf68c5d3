"""Find and re-purpose classifier heads: the fine-tuning recipe's first step.

Caffe copies pretrained weights by layer *name*; a layer whose shape changed must be renamed so
Caffe learns it from scratch instead of failing on the shape mismatch. :func:`rename_heads`
does that for every classifier head at once (GoogLeNet's train_val has three).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import NetError, SurgeryError
from ..layers import LEARNABLE_TYPES, attr, is_loss
from ..net import Net
from . import _common as C
from .report import Report

__all__ = ["find_heads", "rename_heads", "HEAD_TYPES", "DEFAULT_FILLERS"]

HEAD_TYPES = ("InnerProduct", "Convolution")
# What a head gets when its definition sets no filler (Caffe's default, constant 0, would start
# every class score at the same value).
DEFAULT_FILLERS: dict[str, dict[str, Any]] = {
    "InnerProduct": {"type": "gaussian", "std": 0.01},
    "Convolution": {"type": "xavier"},
}
_BIAS_FILLER = {"type": "constant", "value": 0.0}
_ENDS = ("Softmax", "Accuracy")


def find_heads(net: Net) -> list[str]:
    """The classifier heads of ``net``, in net order.

    Rules:

    1. A candidate is an ``InnerProduct`` or ``Convolution`` layer.
    2. It is a head when its output reaches a loss layer, a ``Softmax``, an ``Accuracy`` or a
       net output without passing through another learnable layer (any type with learnable
       blobs: Convolution, InnerProduct, Scale, BatchNorm, ...). Other layers (ReLU, Dropout,
       Flatten, Concat...) are passed through.
    3. Evaluated in every phase (TRAIN and TEST); the answer is the union.

    Raises:
        NetError: no phase of the net resolves.
    """
    heads: set[str] = set()
    for flow in C.flows(net).values():
        outputs = {id(v) for v in flow.outputs}
        for node in flow.nodes:
            if node.layer.type not in HEAD_TYPES or node.layer.name in heads:
                continue
            if _reaches_end(flow, node, outputs):
                heads.add(node.layer.name)
    return [n for n in dict.fromkeys(lay.name for lay in net.layers) if n in heads]


def _reaches_end(flow: Any, start: Any, outputs: set[int]) -> bool:
    stack = list(start.outputs)
    seen: set[int] = set()
    while stack:
        value = stack.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        if id(value) in outputs:
            return True
        for reader, _ in flow.consumers(value):
            lay = reader.layer
            if is_loss(lay) or lay.type in _ENDS:
                return True
            if lay.type in LEARNABLE_TYPES or lay.type in HEAD_TYPES:
                continue
            stack.extend(reader.outputs)
    return False


def _pair(value: Any, what: str) -> tuple[float, ...]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (float(value),)
    try:
        vals = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise SurgeryError(f"{what} must be a number or a pair W,B; got {value!r}") from None
    if not 1 <= len(vals) <= 2:
        raise SurgeryError(f"{what} must be a number or a pair W,B; got {value!r}")
    return vals


def _check_num_output(num_output: Any) -> int:
    if isinstance(num_output, bool) or not isinstance(num_output, (int, np.integer)):
        try:
            as_int = int(str(num_output), 10)
        except ValueError:
            raise SurgeryError(
                f"num_output must be a positive integer (the number of classes); got {num_output!r}"
            ) from None
        num_output = as_int
    if num_output <= 0:
        raise SurgeryError(
            f"num_output must be a positive integer (the number of classes); got {num_output}"
        )
    return int(num_output)


def rename_heads(
    net: Net,
    num_output: int,
    layers: Iterable[str] | str | None = None,
    suffix: str = "_ft",
    rename: Mapping[str, str] | None = None,
    rename_tops: bool = False,
    lr_mult: float | Sequence[float] | None = None,
    rng: np.random.Generator | None = None,
    seed: int | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
) -> tuple[Net, Report]:
    """Rename and resize classifier heads so Caffe learns them from scratch.

    Rules:

    1. The heads are ``layers`` (names, or globs matched against InnerProduct and
       Convolution layers), else the keys of ``rename``, else :func:`find_heads`. Each must be
       an InnerProduct or a Convolution.
    2. Each head is renamed to ``rename[old]`` or ``old + suffix``; every layer of that name
       (TRAIN/TEST twins) together. A new name already in the net is an error.
    3. ``num_output`` is set on each head.
    4. A head without a ``weight_filler`` (or with an all-zero constant one) gets
       :data:`DEFAULT_FILLERS`: gaussian std 0.01 for InnerProduct, xavier for Convolution;
       without a ``bias_filler`` it gets constant 0 (written explicitly).
    5. A head with no ``param { }`` spec gets Caffe's customary multipliers, weight lr_mult 1
       decay_mult 1, bias lr_mult 2 decay_mult 0 (reported). ``lr_mult`` (W or (W, B), e.g.
       (10, 20)) then sets the heads' lr_mult per blob, adding ``param`` entries as needed;
       decay_mult is left as written.
    6. Top blobs keep their names unless ``rename_tops``: then a top named like the layer gets
       the new layer name, any other top gets the suffix; in-place layers and readers follow.
    7. When the net has weights, each head gets fresh blobs of its new shape drawn from its
       fillers (seeded; the weight filler is never all-zero); every other layer keeps its
       blob arrays (the same objects). Learnable layers that have no weights at all (not in
       the caffemodel) are listed in ``report.left``.
    8. An ``Accuracy`` layer that reads a renamed head (directly or through layers without
       learnable blobs) with a ``top_k`` above ``num_output`` gets ``top_k = num_output``
       (reported): Caffe refuses a top_k larger than the class count (GoogLeNet's
       ``loss*/top-5`` with 3 classes).
    9. The result passes :func:`surgery.check.check`.

    Args:
        net: the net (not modified).
        num_output: the new number of outputs (classes).
        layers: head names or globs; default: found by :func:`find_heads`.
        suffix: appended to each head's name (rule 2).
        rename: explicit ``{old: new}`` names (rule 2).
        rename_tops: rename the heads' top blobs too (rule 6).
        lr_mult: the heads' learning-rate multipliers (rule 5).
        rng: the generator for new weights (wins over ``seed``).
        seed: seed for new weights; default :data:`surgery.fillers.DEFAULT_SEED`.
        input_shapes: shapes of input/data tops for the new blobs' shapes (rule 7); default
            what ``surgery info`` infers.

    Returns:
        ``(new net, report)``; ``report.data["renamed"]`` maps old to new names.

    Raises:
        SurgeryError: bad ``num_output`` or ``lr_mult``, or no heads found.
        LayerNotFoundError: a named layer or glob matches nothing (with a did-you-mean).
        NetError: a head is not InnerProduct/Convolution, a new name is taken, or the
            result is invalid.
    """
    num_output = _check_num_output(num_output)
    lr = _pair(lr_mult, "lr_mult") if lr_mult is not None else None
    rename = dict(rename or {})
    report = Report("rename_heads")
    out = net.copy()

    if layers is not None:  # rule 1
        pats = [layers] if isinstance(layers, str) else list(layers)
        globs = [p for p in pats if any(c in p for c in "*?[")]
        exact = C.match_globs(out, [p for p in pats if p not in globs], what="--layer")
        typed = [lay for lay in out.layers if lay.type in HEAD_TYPES]
        found = set(exact) | set(
            C.match_globs(
                out, globs, what="--layer", candidates=typed, kind="InnerProduct or Convolution"
            )
        )
        heads = [n for n in dict.fromkeys(lay.name for lay in out.layers) if n in found]
    elif rename:
        heads = C.match_globs(out, list(rename), what="--rename")
    else:
        heads = find_heads(out)
        if not heads:
            raise SurgeryError(
                f"no classifier heads found in {net.source or 'the net'}: no InnerProduct or "
                "Convolution output reaches a loss, Softmax, Accuracy or net output; name the "
                "layers with --layer"
            )
        report.note(f"heads found: {', '.join(heads)}")
    unknown = [k for k in rename if k not in heads]
    if unknown:
        raise SurgeryError(
            f"--rename names {unknown} which are not among the heads being renamed "
            f"({', '.join(heads)}); add them with --layer"
        )
    for name in heads:
        lay = out.layer(name)
        if lay.type not in HEAD_TYPES:
            raise NetError(
                f"layer {name!r} is a {lay.type}, not a head: rename-heads resizes "
                "InnerProduct or Convolution layers; pick those with --layer"
            )

    new_names = {h: rename.get(h, h + suffix) for h in heads}  # rule 2
    taken = {lay.name for lay in out.layers} - set(heads)
    for old, new in new_names.items():
        if new == old:
            raise SurgeryError(
                f"head {old!r} would keep its name; Caffe would then copy the old weights into "
                "it and fail on the shape. Give a non-empty --suffix or a new name"
            )
        if new in taken or list(new_names.values()).count(new) > 1:
            raise NetError(
                f"cannot rename {old!r} to {new!r}: a layer of that name already exists; "
                "choose another --suffix or --rename"
            )

    # rule 6 first (it reads the dataflow of the unchanged structure)
    top_renames: dict[str, list[tuple[str, str]]] = {}
    if rename_tops:
        for old in heads:
            lay = out.layer(old)
            for ti, top in enumerate(list(lay.tops)):
                new_top = new_names[old] if top == old else top + (suffix or "_ft")
                followers = C.rename_top(out, lay, ti, new_top)
                top_renames.setdefault(old, []).append((top, new_top))
                if followers:
                    report.note(
                        f"top {top!r} -> {new_top!r} also renamed in: " + ", ".join(followers)
                    )

    weighted = net.has_weights
    old_shapes: dict[str, list[tuple[int, ...] | None]] = {}
    for old in heads:
        twins = out.layers_named(old)
        before = attr(twins[0], "num_output", 0)
        added: list[str] = []
        for lay in twins:  # rules 3-5
            lay.attrs["num_output"] = num_output
            wf = lay.attrs.get("weight_filler")
            if wf is None or _all_zero(wf):
                lay.attrs["weight_filler"] = dict(DEFAULT_FILLERS[lay.type])
                if lay is twins[0]:
                    added.append(
                        f"weight_filler {_filler_text(DEFAULT_FILLERS[lay.type])}"
                        + (" (replaced an all-zero constant filler)" if wf is not None else "")
                    )
            if attr(lay, "bias_term", True) and "bias_filler" not in lay.attrs:
                lay.attrs["bias_filler"] = dict(_BIAS_FILLER)
                if lay is twins[0]:
                    added.append("bias_filler constant 0")
            mults = C.customary_mults(lay)  # rule 5: a head with no param spec
            if mults and lay is twins[0]:
                added.append(mults)
            if lr is not None:
                n = C.learnable_count(lay)
                C.ensure_params(lay, min(n, len(lr)))
                for i, v in enumerate(lr[:n]):
                    lay.params[i].lr_mult = v
                    lay.params[i].declared = True
            if lay is twins[0]:
                old_shapes[new_names[old]] = [
                    None if p.data is None else tuple(p.data.shape) for p in lay.params
                ]
            for p in lay.params:  # old blobs do not fit the new shape
                p.data = None
        out.rename_layer(old, new_names[old])
        entry: dict[str, Any] = {
            "old_name": old,
            "new_name": new_names[old],
            "num_output": [before, num_output],
            "fillers_added": added,
            "type": twins[0].type,
        }
        if lr is not None:
            entry["lr_mult"] = list(lr)
        if old in top_renames:
            entry["tops"] = [list(t) for t in top_renames[old]]
        desc = f"renamed to {new_names[old]!r}, num_output {before} -> {num_output}"
        if added:
            desc += "; added " + ", ".join(added)
        if lr is not None:
            desc += f"; lr_mult {','.join(f'{v:g}' for v in lr)}"
        report.change(old, desc, **{k: v for k, v in entry.items() if k != "old_name"})

    _lower_top_k(out, [new_names[h] for h in heads], num_output, report)  # rule 8

    if weighted:  # rule 7
        gen, used_seed = C.make_rng(seed, rng)
        report.seed = used_seed
        shapes = _fill_heads(out, [new_names[h] for h in heads], gen, num_output, old_shapes,
                             input_shapes)
        for old in heads:
            report.change(
                old,
                "fresh random weights "
                + ", ".join("x".join(map(str, s)) for s in shapes[new_names[old]]),
                blob_shapes=[list(s) for s in shapes[new_names[old]]],
            )
        named = out.by_name()
        kept = sum(1 for lay in out.layers if lay.has_weights) - sum(
            len(named.get(new_names[h], [])) for h in heads
        )
        report.leave(None, f"{kept} other layer(s) keep their weights unchanged")
        for name in dict.fromkeys(  # issue 7 item 3: never hide layers without weights
            lay.name for lay in out.layers
            if C.learnable_count(lay) > 0
            and not any(t.has_weights for t in named[lay.name])
        ):
            report.leave(name, "no weights in the input caffemodel: Caffe draws it from its "
                         "fillers (surgery.ops.init_weights, --fill-missing, writes values)")
    report.data["renamed"] = dict(new_names)
    report.data["num_output"] = num_output
    report.data["heads"] = list(heads)
    return C.finish(out, report)  # rule 9


def _lower_top_k(net: Net, heads: list[str], num_output: int, report: Report) -> None:
    """Rule 8: Accuracy layers downstream of a head get top_k <= num_output."""
    readers: dict[int, Any] = {}
    for flow in C.flows(net).values():
        stack = [v for n in flow.nodes if n.layer.name in heads for v in n.outputs]
        seen: set[int] = set()
        while stack:
            value = stack.pop()
            if id(value) in seen:
                continue
            seen.add(id(value))
            for node, bi in flow.consumers(value):
                lay = node.layer
                if lay.type == "Accuracy" and bi == 0:
                    readers[id(lay)] = lay
                elif lay.type not in LEARNABLE_TYPES and lay.type not in HEAD_TYPES:
                    stack.extend(node.outputs)
    for lay in net.layers:
        if id(lay) not in readers:
            continue
        top_k = int(attr(lay, "top_k", 1))
        if top_k > num_output:
            lay.attrs["top_k"] = num_output
            report.change(lay.name, f"top_k {top_k} -> {num_output}: Caffe refuses a top_k "
                          f"above the number of classes ({num_output})", top_k=[top_k, num_output])


def _all_zero(filler: Any) -> bool:
    if not isinstance(filler, dict):
        return False
    return filler.get("type", "constant") == "constant" and float(filler.get("value", 0)) == 0


def _filler_text(f: dict[str, Any]) -> str:
    rest = " ".join(
        f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in f.items() if k != "type"
    )
    return f"{f['type']}" + (f" {rest}" if rest else "")


def _fill_heads(
    net: Net,
    names: list[str],
    rng: np.random.Generator,
    num_output: int,
    old_shapes: dict[str, list[tuple[int, ...] | None]],
    input_shapes: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, list[tuple[int, ...]]]:
    """Fresh blobs for the renamed heads; shapes from inference, else from the old blobs."""
    try:
        return C.fill_new_weights(net, names, rng, dict(input_shapes or {}) or None)
    except SurgeryError as exc:
        error = exc
    from ..fillers import fill_layer

    out: dict[str, list[tuple[int, ...]]] = {}
    named = net.by_name()
    for name in names:
        twins = named[name]
        lay = twins[0]
        old = old_shapes.get(name) or []
        if not old or old[0] is None:
            raise NetError(
                f"cannot infer the input size of head {name!r} to draw its new weights "
                f"({error}); give the data layer a crop_size and batch_size, or use a net with "
                "an Input layer"
            )
        w = list(old[0])
        w[1 if lay.type == "InnerProduct" and attr(lay, "transpose", False) else 0] = num_output
        shapes = [tuple(w)] + ([(num_output,)] if C.learnable_count(lay) > 1 else [])
        blobs = fill_layer(lay, shapes, rng)
        for t in twins:
            C.ensure_params(t, len(blobs))
            del t.params[len(blobs) :]
            for p, b in zip(t.params, blobs, strict=True):
                p.data = b
        out[name] = shapes
    return out
