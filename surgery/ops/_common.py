"""Helpers shared by the surgery ops (heads, lr, deploy, insert, transplant, recipes).

A small, stable API; every function works on a :class:`~surgery.net.Net` *copy* that the op
owns (ops never mutate their input), and never writes into a weight array (they are read-only):
new values are new arrays.

- :data:`PHASES` / :func:`flows`: the TRAIN and TEST dataflows, for "union over phases" rules.
- :func:`infer_shapes` / :func:`guess_input_shapes`: shapes, with dataset layers' shapes read
  off their batch_size / crop_size / mean values (train_val nets).
- :func:`make_rng`: the seeded generator and the seed to report.
- :func:`param_shapes` / :func:`learnable_count`: learnable blob shapes of a layer as Caffe
  would create them (from :mod:`surgery.shapes`).
- :func:`ensure_params`: pad ``layer.params`` to one entry per learnable blob.
- :func:`new_layer_weights` / :func:`fill_new_weights` / :func:`fill_missing_weights`: fresh
  blobs from layers' fillers.
- :func:`consumers_of`, :func:`rewire`: redirect the readers of one layer's output;
  :func:`rename_top`: rename a layer's output blob with its in-place chain and readers.
- :func:`unique_name`, :func:`match_globs`, :func:`finish`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from ..dataflow import Dataflow, resolve
from ..errors import LayerNotFoundError, NetError, SurgeryError, did_you_mean
from ..layers import WEIGHT_BIAS_TYPES
from ..net import Layer, Net, NetState
from ..shapes import guess_dataset_shapes

__all__ = [
    "PHASES",
    "flows",
    "guess_input_shapes",
    "infer_shapes",
    "make_rng",
    "param_shapes",
    "learnable_count",
    "ensure_params",
    "CUSTOMARY_MULTS",
    "customary_mults",
    "new_layer_weights",
    "fill_new_weights",
    "fill_missing_weights",
    "consumers_of",
    "rewire",
    "rename_top",
    "unique_name",
    "match_globs",
    "finish",
]

PHASES = ("TRAIN", "TEST")


def flows(net: Net, *, strict: bool = False) -> dict[str, Dataflow]:
    """The dataflow of ``net`` for each default phase (TRAIN, TEST).

    Args:
        net: the net.
        strict: raise when a phase cannot be resolved; otherwise that phase is left out
            (a deploy net with a TRAIN-only problem still gives its TEST view).

    Raises:
        NetError: ``strict`` and a phase fails, or no phase resolves at all.
    """
    out: dict[str, Dataflow] = {}
    first_error: SurgeryError | None = None
    for phase in PHASES:
        try:
            out[phase] = resolve(net, NetState(phase))
        except SurgeryError as exc:
            if strict:
                raise
            first_error = first_error or exc
    if not out:
        assert first_error is not None
        raise first_error
    return out


def make_rng(
    seed: int | None = None, rng: np.random.Generator | None = None
) -> tuple[np.random.Generator, int | None]:
    """The generator an op draws from, and the seed to report.

    ``rng`` wins when given (its seed is unknown: reported as None); otherwise ``seed``
    (default :data:`surgery.fillers.DEFAULT_SEED`).
    """
    from ..fillers import DEFAULT_SEED

    if rng is not None:
        return rng, seed
    seed = DEFAULT_SEED if seed is None else int(seed)
    return np.random.default_rng(seed), seed


def guess_input_shapes(flow: Dataflow) -> dict[str, tuple[int, ...]]:
    """Shapes for the tops of dataset layers (``Data``, ``ImageData``...) that shape inference
    cannot know, read off the definition by :func:`surgery.shapes.guess_dataset_shapes`
    (channels never assumed: only from loaded weights, mean values or ``is_color``)."""
    return guess_dataset_shapes(flow, assume_channels=None)[0]


def infer_shapes(
    net: Net, phase: str = "TEST", input_shapes: dict[str, Any] | None = None, *, guess: bool = True
) -> tuple[Dataflow, Any]:
    """Resolve ``net`` for ``phase`` and infer its shapes (:func:`surgery.shapes.infer`).

    Args:
        net: the net.
        phase: "TRAIN" or "TEST".
        input_shapes: explicit shapes by top name (they win over guesses).
        guess: fill dataset layers' shapes as ``surgery info`` does
            (:func:`surgery.shapes.starting_shapes`: channels assumed 3 when nothing tells).

    Returns:
        ``(flow, ShapeInfo)``.

    Raises:
        NetError: the phase does not resolve.
        ShapeMismatchError: a layer Caffe would refuse.
    """
    from ..shapes import infer, starting_shapes

    flow = resolve(net, NetState(phase))
    if guess:
        given = starting_shapes(flow, input_shapes)[0]
    else:
        given = dict(input_shapes or {})
    return flow, infer(flow, given)


def _infos(
    net: Net, input_shapes: dict[str, Any] | None = None
) -> list[tuple[Dataflow, Any]]:
    out = []
    for phase in ("TEST", "TRAIN"):
        try:
            out.append(infer_shapes(net, phase, input_shapes))
        except SurgeryError:
            continue
    return out


def param_shapes(
    net: Net, layer: Layer | str, *, _cache: list[Any] | None = None
) -> list[tuple[int, ...]]:
    """The learnable blob shapes Caffe would create for ``layer`` (its first phase that
    resolves and infers).

    Args:
        net: the net holding the layer.
        layer: the layer object (identity matters for TRAIN/TEST twins) or its name.

    Raises:
        LayerNotFoundError: no such layer.
        NetError: the shapes cannot be inferred in any phase (the message says why).
    """
    lay = net.layer(layer) if isinstance(layer, str) else layer
    for flow, info in _cache if _cache is not None else _infos(net):
        for node in flow.nodes:
            # a node missing from node_params has unknown bottom shapes: try the next phase
            if node.layer is lay and node in info.node_params:
                return [tuple(int(d) for d in s) for s in info.params(node)]
    raise NetError(
        f"layer {lay.name!r} ({lay.type}): cannot infer its learnable blob shapes (is it "
        "included in any phase, with known input shapes?); give the net an input shape "
        "(Input layer or --input-shape)"
    )


def learnable_count(layer: Layer) -> int:
    """How many learnable blobs Caffe gives ``layer`` (``LayerSetUp``'s rules by type).

    Convolution/Deconvolution/InnerProduct/Embed: weight, plus bias unless ``bias_term:
    false``; Scale: the scale (unless it comes as a second bottom) plus bias with ``bias_term``;
    Bias: 1 unless a second bottom; PReLU, Normalize, Parameter: 1; BatchNorm: 3; the forks' BN:
    4 (PSPNet) or 2 (SegNet), see :func:`surgery.layers.bn_layout`. Other types:
    the loaded blobs (fork types), else 0.
    """
    from ..layers import attr, bn_layout

    t = layer.type
    if t in WEIGHT_BIAS_TYPES:
        return 2 if attr(layer, "bias_term", True) else 1
    if t == "Scale":
        return (1 if len(layer.bottoms) < 2 else 0) + (1 if attr(layer, "bias_term", False) else 0)
    if t == "Bias":
        return 1 if len(layer.bottoms) < 2 else 0
    if t in ("PReLU", "Normalize", "Parameter"):
        return 1
    if t == "BatchNorm":
        return 3
    if t == "BN":
        return 4 if bn_layout(layer) == "pspnet" else 2
    return sum(1 for p in layer.params if p.data is not None)


def ensure_params(layer: Layer, count: int) -> None:
    """Pad ``layer.params`` with empty entries so it has at least ``count`` of them."""
    from ..net import Param

    while len(layer.params) < count:
        layer.params.append(Param())


# Caffe's customary multipliers for a new learnable layer (as BVLC's nets write them): weight
# lr_mult 1 / decay_mult 1, bias lr_mult 2 / decay_mult 0 (the bias learns twice as fast and
# is not decayed).
CUSTOMARY_MULTS: tuple[tuple[float, float], ...] = ((1.0, 1.0), (2.0, 0.0))


def customary_mults(layer: Layer) -> str | None:
    """Give a new weight+bias layer with no ``param { }`` spec :data:`CUSTOMARY_MULTS`.

    Only Convolution/Deconvolution/InnerProduct/Embed layers with a bias (``bias_term`` not
    false) are touched; a layer whose params already carry a spec keeps it.

    Returns:
        A sentence for the report, or None when nothing was set.
    """
    if layer.type not in WEIGHT_BIAS_TYPES or learnable_count(layer) != 2:
        return None
    if any(p.has_spec for p in layer.params):
        return None
    ensure_params(layer, 2)
    for p, (lr, decay) in zip(layer.params, CUSTOMARY_MULTS, strict=False):
        p.lr_mult, p.decay_mult, p.declared = lr, decay, True
    return "weight lr_mult 1 decay_mult 1, bias lr_mult 2 decay_mult 0 (Caffe's customary)"


def new_layer_weights(net: Net, layer: Layer | str, rng: np.random.Generator) -> list[np.ndarray]:
    """Fresh values for every learnable blob of ``layer``, drawn from its fillers
    (:func:`surgery.fillers.layer_fillers`) with shapes from shape inference.

    The arrays are new and read-only; nothing is assigned (see :func:`fill_new_weights`).

    Raises:
        NetError: the shapes cannot be inferred.
    """
    from ..fillers import fill_layer

    lay = net.layer(layer) if isinstance(layer, str) else layer
    return fill_layer(lay, param_shapes(net, lay), rng)


def fill_new_weights(
    net: Net, names: Iterable[str], rng: np.random.Generator,
    input_shapes: dict[str, Any] | None = None,
) -> dict[str, list[tuple[int, ...]]]:
    """Give every layer called one of ``names`` fresh blobs from its fillers, in place on
    ``net`` (which must be the op's own copy). TRAIN/TEST twins get the same arrays. Shapes
    come from the input shapes ``surgery info`` infers, unless ``input_shapes`` gives them.

    Returns:
        ``{layer name: [blob shapes]}``.

    Raises:
        LayerNotFoundError: a name is not in the net.
        NetError: shapes cannot be inferred.
    """
    cache = _infos(net, input_shapes)
    out: dict[str, list[tuple[int, ...]]] = {}
    from ..fillers import fill_layer

    named = net.by_name()
    for name in names:
        twins = named.get(name, [])
        if not twins:
            net.layer(name)  # raises with did-you-mean
        shapes = param_shapes(net, twins[0], _cache=cache)
        blobs = fill_layer(twins[0], shapes, rng)
        for lay in twins:
            ensure_params(lay, len(blobs))
            del lay.params[len(blobs) :]
            for p, b in zip(lay.params, blobs, strict=True):
                p.data = b
        out[name] = [tuple(b.shape) for b in blobs]
    return out


def fill_missing_weights(net: Net, rng: np.random.Generator) -> list[str]:
    """Give every learnable layer of ``net`` that has no weights fresh blobs from its fillers
    (in place on the op's own copy): what Caffe does for layers a caffemodel does not cover.

    Returns:
        The names of the layers filled, in net order.

    Raises:
        NetError: shapes cannot be inferred for one of them.
    """
    named = net.by_name()
    names = list(
        dict.fromkeys(
            lay.name
            for lay in net.layers
            if learnable_count(lay) > 0
            and not any(t.has_weights for t in named[lay.name])
        )
    )
    if names:
        fill_new_weights(net, names, rng)
    return names


def consumers_of(net: Net, layer: Layer | str, top_index: int = 0) -> list[tuple[Layer, int]]:
    """Every (layer, bottom index) that reads exactly output ``top_index`` of ``layer``.

    This is the value the layer itself produces: when an in-place layer (a ReLU) follows, the
    in-place layer is the reader, and layers after it read the ReLU's version instead. Union
    over TRAIN and TEST, in net order, without duplicates.

    Raises:
        LayerNotFoundError: no such layer.
    """
    lays = [net.layer(layer)] if isinstance(layer, str) else [layer]
    name = lays[0].name
    twins = net.layers_named(name)
    seen: set[tuple[int, int]] = set()
    out: list[tuple[Layer, int]] = []
    for flow in flows(net).values():
        for node in flow.nodes:
            if not any(node.layer is t for t in twins):
                continue
            if top_index >= len(node.outputs):
                raise NetError(f"layer {name!r} has no top {top_index}")
            for reader, bi in flow.consumers(node.outputs[top_index]):
                key = (id(reader.layer), bi)
                if key not in seen:
                    seen.add(key)
                    out.append((reader.layer, bi))
    order = {id(lay): i for i, lay in enumerate(net.layers)}
    out.sort(key=lambda t: (order[id(t[0])], t[1]))
    return out


def rewire(readers: Sequence[tuple[Layer, int]], new_blob: str) -> list[str]:
    """Point each (layer, bottom index) at ``new_blob``; returns the layer names changed.

    The layers must belong to the op's own copy of the net.
    """
    names = []
    for lay, bi in readers:
        lay.bottoms[bi] = new_blob
        if lay.name not in names:
            names.append(lay.name)
    return names


def rename_top(net: Net, layer: Layer | str, top_index: int, new_blob: str) -> list[str]:
    """Rename output ``top_index`` of ``layer`` (every TRAIN/TEST twin) to ``new_blob``, with
    every in-place layer that continues that value and every reader of it, in all phases.

    Works on the op's own copy. Returns the names of the other layers changed.

    Raises:
        LayerNotFoundError: no such layer.
        NetError: ``new_blob`` is already a blob name in the net.
    """
    lay = net.layer(layer) if isinstance(layer, str) else layer
    twins = net.layers_named(lay.name)
    if any(new_blob in other.tops for other in net.layers):
        raise NetError(
            f"cannot rename top {lay.tops[top_index]!r} of layer {lay.name!r} to {new_blob!r}: "
            "a blob of that name already exists; choose another name"
        )
    edits: list[tuple[Layer, str, int]] = []  # (layer, "bottom"|"top", index)
    for flow in flows(net).values():
        chain: set[int] = set()
        for node in flow.nodes:
            if any(node.layer is t for t in twins):
                chain.add(id(node.outputs[top_index]))
                edits.append((node.layer, "top", top_index))
                continue
            for bi, v in enumerate(node.inputs):
                if id(v) in chain:
                    edits.append((node.layer, "bottom", bi))
            for ti, v in enumerate(node.outputs):
                if node.inplace[ti] and id(node.inputs[ti]) in chain:
                    chain.add(id(v))
                    edits.append((node.layer, "top", ti))
    changed: list[str] = []
    done: set[tuple[int, str, int]] = set()
    for target, kind, i in edits:
        key = (id(target), kind, i)
        if key in done:
            continue
        done.add(key)
        (target.tops if kind == "top" else target.bottoms)[i] = new_blob
        if target.name != lay.name and target.name not in changed:
            changed.append(target.name)
    return changed


def unique_name(net: Net, base: str, *, blobs: bool = True) -> str:
    """``base``, or ``base_2``, ``base_3``... so it is free as a layer name (and as a blob name
    when ``blobs``)."""
    taken = {lay.name for lay in net.layers}
    if blobs:
        taken |= {t for lay in net.layers for t in lay.tops}
    name, i = base, 2
    while name in taken:
        name = f"{base}_{i}"
        i += 1
    return name


def match_globs(
    net: Net,
    patterns: Iterable[str] | str | None,
    *,
    what: str = "--layers",
    candidates: Sequence[Layer] | None = None,
    kind: str = "",
) -> list[str]:
    """Layer names (unique, net order) matching any glob; each glob must match something.

    Args:
        net: the net.
        patterns: globs (``"inception_4*"``) or exact names; a single string is one pattern.
        what: the option name, for messages.
        candidates: restrict matching to these layers (e.g. learnable ones).
        kind: describes the candidates in messages ("InnerProduct or Convolution").

    Raises:
        LayerNotFoundError: a pattern matches no layer (with a did-you-mean).
    """
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    pool = list(candidates) if candidates is not None else net.layers
    names = list(dict.fromkeys(lay.name for lay in pool))
    chosen: set[str] = set()
    for pat in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pat)]
        if not hits:
            where = f" in {net.source}" if net.source else ""
            kinds = f"{kind} " if kind else ""
            if any(c in pat for c in "*?["):
                msg = f"{what}: glob {pat!r} matches no {kinds}layer{where}"
            else:
                msg = f"{what}: no {kinds}layer named {pat!r}{where}"
            raise LayerNotFoundError(msg + did_you_mean(pat, names))
        chosen.update(hits)
    return [n for n in names if n in chosen]


def finish(net: Net, report: Any) -> tuple[Net, Any]:
    """End an op: run :func:`surgery.check.assert_valid` and return ``(net, report)``.

    Raises:
        NetError: the result is not a net Caffe would accept (a bug or a bad request).
    """
    from ..check import assert_valid

    assert_valid(net)
    return net, report
