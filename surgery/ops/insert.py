"""Insert layers on existing values: an ``Eltwise`` on two of them, or a learned gate.

How a bottom is named (the same for ``insert_eltwise``'s ``bottoms`` and ``insert_gate``'s
``at``; ``../shared/STYLE.md``: an edge is a *layer + top index*, not a blob name):

1. ``LAYER`` -- a layer name -- means that layer's own output, top 0: ``conv1`` is what
   ``conv1`` computes, *before* an in-place ``relu1`` that follows it. ``LAYER:i`` picks top
   ``i``. To mean the value after the in-place chain, name the last in-place layer (``relu1``).
2. Otherwise the name is a blob name and means the blob's *last* version (its value at the end
   of the in-place chain, what Caffe's blob holds after a forward pass).
3. A layer name wins over a blob of the same name (rule 1 keeps every value reachable).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ..dataflow import Dataflow, Node, Value, resolve
from ..errors import NetError, ShapeMismatchError
from ..net import Layer, Net, NetState, Rule, freeze_array
from . import rewire
from ._common import customary_mults, finish, flows, infer_shapes, make_rng, unique_name
from .report import Report
from .values import resolve_value as _resolve_edge

__all__ = ["insert_eltwise", "insert_gate", "OPERATIONS", "IDENTITY_SIGMOID_BIAS"]

OPERATIONS = {"prod": "PROD", "sum": "SUM", "max": "MAX"}
OPERATIONS_REV = {v: k for k, v in OPERATIONS.items()}

# sigmoid(40) is exactly 1.0 in float32 both as 1 / (1 + exp(-b)) (OpenCV, PyTorch) and as
# Caffe's 0.5 * tanh(0.5 * b) + 0.5: exp(-40) ~ 4e-18 is far below float32's half-ulp of 1.
IDENTITY_SIGMOID_BIAS = 40.0
assert np.float32(1) / (np.float32(1) + np.exp(np.float32(-IDENTITY_SIGMOID_BIAS))) == 1.0
assert np.float32(0.5) * np.tanh(np.float32(IDENTITY_SIGMOID_BIAS / 2)) + np.float32(0.5) == 1.0


def _describe(flow: Dataflow, value: Value) -> str:
    """``(output 0 of layer 'conv1', before in-place 'relu1')`` for messages."""
    text = f"(output {value.top_index} of layer {value.producer.layer.name!r}"
    later = [n.layer.name for n, bi in flow.consumers(value)
             if bi < len(n.inplace) and n.inplace[bi]]
    if later:
        text += f", before in-place {later[0]!r}"
    return text + ")"


# -- the shared core: place an Eltwise on two values and rewire consumers ---------------------
@dataclass
class _Placed:
    eltwise: str
    tile: str | None
    tiled: str | None  # which bottom got the Tile ("a" or "b")
    position: int
    phases: list[str]
    feature: str = "a"  # the bottom whose shape the product has ("a" or "b")
    rewired: list[dict[str, Any]] = field(default_factory=list)
    kept: list[dict[str, Any]] = field(default_factory=list)
    moved: list[str] = field(default_factory=list)
    shapes: dict[str, Any] = field(default_factory=dict)


def _views(net: Net, shapes: dict[str, Any] | None = None) -> dict[str, tuple[Dataflow, Any]]:
    """Per phase that resolves: (flow, ShapeInfo); a net Caffe would refuse raises."""
    return {phase: infer_shapes(net, phase, shapes) for phase in flows(net)}


def _shape(info: Any, value: Value) -> tuple[int, ...] | None:
    if info is None:
        return None
    s = info.shape(value)
    return None if s is None else tuple(int(d) for d in s)


def _fmt(shape: tuple[int, ...] | None) -> str:
    return "unknown" if shape is None else "x".join(str(d) for d in shape)


def _tile_plan(sa: tuple[int, ...], sb: tuple[int, ...]) -> tuple[str, int] | None:
    """('a'|'b', tiles) when one side has 1 channel and the other C, all else equal."""
    if len(sa) != len(sb) or len(sa) < 2 or sa[0] != sb[0] or sa[2:] != sb[2:]:
        return None
    if sa[1] == 1 and sb[1] > 1:
        return "a", sb[1]
    if sb[1] == 1 and sa[1] > 1:
        return "b", sa[1]
    return None


_Active = dict[str, tuple[Dataflow, Any, Value, Value]]


def _activate(net: Net, a_spec: str, b_spec: str, what: str,
              shapes: dict[str, Any] | None = None) -> tuple[dict[str, Any], _Active]:
    views = _views(net, shapes)
    active: _Active = {}
    for phase, (flow, info) in views.items():
        va, vb = _resolve_edge(flow, net, a_spec), _resolve_edge(flow, net, b_spec)
        if va is not None and vb is not None:
            active[phase] = (flow, info, va, vb)
    if not active:
        raise NetError(
            f"{what}: {a_spec!r} and {b_spec!r} are never in the same phase "
            f"(checked {', '.join(views)}); both bottoms must exist in one net"
        )
    return views, active


def _plan_tile(active: _Active, a_spec: str, b_spec: str, what: str
               ) -> tuple[tuple[str, int] | None, dict[str, Any]]:
    """Rules 3/4: equal shapes, or a Tile for 1 channel against C."""
    tiled: tuple[str, int] | None = None
    decided = False
    shapes: dict[str, Any] = {}
    for phase, (flow, info, va, vb) in active.items():
        sa, sb = _shape(info, va), _shape(info, vb)
        shapes[phase] = {"a": sa, "b": sb}
        if sa is None or sb is None:
            continue
        plan = None if sa == sb else _tile_plan(sa, sb)
        if sa != sb and plan is None:
            raise ShapeMismatchError(
                f"{what}: bottoms have different shapes in the {phase} net: {a_spec!r} "
                f"{_describe(flow, va)} is {_fmt(sa)} and {b_spec!r} {_describe(flow, vb)} is "
                f"{_fmt(sb)}. Eltwise needs identical shapes (no broadcasting); "
                "only 1 channel against C channels (same N, H, W) is tiled automatically. "
                "Pick bottoms of equal shape, or add Crop/Reshape/Pooling first"
            )
        if decided and plan != tiled:
            raise ShapeMismatchError(
                f"{what}: the bottoms' shapes differ between phases ({shapes}); cannot insert "
                "one Eltwise consistently for all phases"
            )
        tiled, decided = plan, True
    if not decided:
        _refuse_unknown(active, a_spec, b_spec, what)
    return tiled, shapes


# Layers whose top has the channels of their first bottom (for rule 8, without shapes).
_SAME_CHANNELS = frozenset({
    "ReLU", "PReLU", "Sigmoid", "TanH", "ELU", "AbsVal", "Power", "Exp", "Log", "BNLL",
    "Threshold", "Clip", "Swish", "Dropout", "BatchNorm", "BN", "Scale", "Bias", "LRN", "MVN",
    "Pooling", "Crop", "Eltwise", "Normalize", "Interp", "Upsample", "Split", "Softmax",
})
_NUM_OUTPUT = frozenset({"Convolution", "Deconvolution", "ConvolutionDepthwise",
                         "DepthwiseConvolution"})


def _channels(flow: Dataflow, value: Value, depth: int = 0) -> int | None:
    """A value's channel count from the definition alone (num_output up the chain)."""
    lay = value.producer.layer
    if depth > 200:
        return None
    if lay.type in _NUM_OUTPUT and "num_output" in lay.attrs:
        return int(lay.attrs["num_output"])
    node = value.producer
    if lay.type in _SAME_CHANNELS and node.inputs and not (
            lay.type == "Crop" and int(lay.attrs.get("axis", 2)) < 2):
        return _channels(flow, node.inputs[0], depth + 1)
    if lay.type == "Concat" and int(lay.attrs.get("axis", lay.attrs.get("concat_dim", 1))) == 1:
        cs = [_channels(flow, v, depth + 1) for v in node.inputs]
        return None if any(c is None for c in cs) else sum(c for c in cs if c is not None)
    return None


def _refuse_unknown(active: _Active, a_spec: str, b_spec: str, what: str) -> None:
    """Rule 8: shapes unknown in every phase. Equal channel counts known from the definition
    (num_output up the chain) are accepted unchecked; otherwise a Tile may be needed and
    cannot be decided, so the op refuses rather than write an Eltwise Caffe may refuse."""
    flow, info, va, vb = next(iter(active.values()))
    ca, cb = _channels(flow, va), _channels(flow, vb)
    if ca is not None and ca == cb:
        return
    tops = []
    for node in flow.nodes:
        if not node.inputs:
            tops += [(node.layer, v.name) for v in node.outputs if _shape(info, v) is None]
    image = [(lay, t) for lay, t in tops if t == lay.tops[0]] or tops
    where = ", ".join(f"{t!r} (layer {lay.name!r}, {lay.type})" for lay, t in image)
    fix = " ".join(f"--input-shape {t}=N,C,H,W" for _, t in image) or "--input-shape BLOB=N,C,H,W"
    chans = f"{'unknown' if ca is None else ca} and {'unknown' if cb is None else cb}"
    raise ShapeMismatchError(
        f"{what}: cannot check the bottoms' shapes: {a_spec!r} and {b_spec!r} have unknown "
        f"shapes (the definition gives no shape for {where or 'the inputs'}) and their channel "
        f"counts ({chans}) may need a Tile; Eltwise needs identical shapes. Give the input "
        f"shape: {fix} (Python: input_shapes={{...}})"
    )


def _choose(active: _Active, feature: str, feed: list[str] | None, enabled: bool, what: str
            ) -> tuple[dict[str, list[tuple[Node, int]]], list[dict[str, Any]]]:
    """Rule 5: the readers of the feature bottom that read the product, per phase."""
    chosen: dict[str, list[tuple[Node, int]]] = {}
    kept: list[dict[str, Any]] = []
    wanted = None if feed is None else list(dict.fromkeys(feed))
    readers: set[str] = set()
    for phase, (flow, _, va, vb) in active.items():
        vf, vo = (va, vb) if feature == "a" else (vb, va)
        feeds_other = {id(n) for n in flow.ancestors(vo.producer)}
        chosen[phase] = []
        for node, bi in flow.consumers(vf):
            lname = node.layer.name
            readers.add(lname)
            why = None
            if not enabled:
                why = f"reads {vf.name!r} (bottom {bi}); --no-rewire"
            elif wanted is not None and lname not in wanted:
                why = f"reads {vf.name!r} (bottom {bi}); not named in --feed"
            elif id(node) in feeds_other:
                if wanted is not None:
                    raise NetError(
                        f"{what}: --feed {lname!r}: that layer feeds the other bottom "
                        f"{vo.name!r}, so reading the product would create a cycle"
                    )
                why = f"reads {vf.name!r} (bottom {bi}) and feeds the other bottom {vo.name!r}"
            if why is None:
                chosen[phase].append((node, bi))
            elif not any(k["layer"] == lname for k in kept):
                kept.append({"layer": lname, "why": why})
    if wanted is not None:
        missing = [n for n in wanted if n not in readers]
        if missing:
            v = next(iter(active.values()))
            vf = v[2] if feature == "a" else v[3]
            raise NetError(
                f"{what}: --feed {', '.join(missing)}: not a reader of {vf.name!r} (the bottom "
                f"whose shape the product has); its readers are: "
                f"{', '.join(sorted(readers)) or 'none'}"
            )
    return chosen, kept


def _hoist_producers(net: Net, active: _Active, chosen: dict[str, list[tuple[Node, int]]],
                     what: str) -> list[str]:
    """Rule 1: when a consumer to take over comes before the later producer in the file, move
    the producers' ancestors that sit at or after that consumer to just before it."""
    first: Node | None = None
    for nodes in chosen.values():
        for node, _ in nodes:
            if first is None or node.net_index < first.net_index:
                first = node
    last = max(max(va.producer.net_index, vb.producer.net_index)
               for _, _, va, vb in active.values())
    if first is None or last < first.net_index:
        return []
    movers: dict[int, Layer] = {}
    for flow, _, va, vb in active.values():
        for n in flow.ancestors(va.producer) + flow.ancestors(vb.producer):
            if n.net_index >= first.net_index:
                movers[id(n.layer)] = n.layer
    taking = {id(n.layer) for nodes in chosen.values() for n, _ in nodes}
    if taking & set(movers):  # pragma: no cover - _choose drops readers that feed a bottom
        raise NetError(f"{what}: a consumer to rewire feeds a bottom: a cycle")
    before = {p: rewire.edges(flow) for p, (flow, _, _, _) in active.items()}
    order = [lay for lay in net.layers if id(lay) in movers]
    rewire.hoist(net, order, first.layer)
    for phase in before:
        after = rewire.edges(resolve(net, NetState(phase)))
        bad = rewire.changed_edges(before[phase], after)
        if bad:
            names = {id(lay): lay.name for lay in net.layers}
            raise NetError(
                f"{what}: the product must be computed before {first.layer.name!r}, which "
                f"means moving {', '.join(lay.name for lay in order)} up, but then "
                f"{', '.join(sorted({names[k[0]] for k in bad}))} would read other values in "
                f"the {phase} net. Use --feed to choose later consumers, or --no-rewire"
            )
    return [lay.name for lay in order]


def _place_eltwise(net: Net, a_spec: str, b_spec: str, operation: str, coeff: list[float] | None,
                   name: str | None, tile_name: str | None, what: str,
                   feed: list[str] | None = None, rewire_: bool = True,
                   input_shapes: dict[str, Any] | None = None) -> _Placed:
    """Rules 1-7 of :func:`insert_eltwise`, applied in place to ``net`` (the op's own copy)."""
    views, active = _activate(net, a_spec, b_spec, what, input_shapes)
    tiled, shapes = _plan_tile(active, a_spec, b_spec, what)
    feature = "b" if tiled is not None and tiled[0] == "a" else "a"
    chosen, kept = _choose(active, feature, feed, rewire_, what)
    moved = _hoist_producers(net, active, chosen, what)
    if moved:  # the file order changed: resolve again (values are named by layer + top)
        specs = [f"{v.producer.layer.name}:{v.top_index}" for v in next(iter(active.values()))[2:]]
        views, active = _activate(net, specs[0], specs[1], what, input_shapes)
        chosen, kept = _choose(active, feature, feed, rewire_, what)
    # rule 1: after both producers, in every phase
    position = 1 + max(
        max(va.producer.net_index, vb.producer.net_index) for _, _, va, vb in active.values()
    )
    # rule 2: neither value may be overwritten in place before the Eltwise reads it
    for flow, _, va, vb in active.values():
        for spec, v, other, other_spec in ((a_spec, va, vb, b_spec), (b_spec, vb, va, a_spec)):
            for node, bi in flow.consumers(v):
                if node.net_index >= position or not (bi < len(node.inplace) and node.inplace[bi]):
                    continue
                feeds = any(n is node for n in flow.ancestors(other.producer))
                verb = "produces" if node is other.producer else "feeds"
                why = (
                    f"and {node.layer.name!r} {verb} {other_spec!r}, so the Eltwise would have to "
                    "run both before and after it: rewiring it would create a cycle"
                    if feeds
                    else f"before {other_spec!r} is produced, so Caffe no longer holds it there"
                )
                raise NetError(
                    f"{what}: bottom {spec!r} {_describe(flow, v)} is overwritten in place by "
                    f"layer {node.layer.name!r} {why}. Name {node.layer.name!r} to use the value "
                    f"after it, or give {node.layer.name!r} its own top so both values exist"
                )
    # names (rule 6)
    base = OPERATIONS_REV.get(operation, operation.lower())
    a_blob = active[next(iter(active))][2].name
    if name is not None:
        taken = {lay.name for lay in net.layers} | {t for lay in net.layers for t in lay.tops}
        if name in taken:
            raise NetError(f"{what}: a layer or blob named {name!r} already exists; choose "
                           "another --name")
        elt_name = name
    else:
        elt_name = unique_name(net, f"{a_blob}_{base}")
    # rule 5: the chosen readers (and in-place chains on them) read the product
    plans = {p: rewire.takeover(flow, chosen[p], elt_name) for p, (flow, _, _, _) in
             active.items()}
    _check_consistent(plans, {p: v[0] for p, v in active.items()}, what)
    placed = _Placed(elt_name, None, None, position, list(active), feature=feature,
                     kept=kept, moved=moved, shapes=shapes)
    edits: rewire.Edit = {}
    for plan in plans.values():
        edits.update(plan)
    before = {p: rewire.edges(flow) for p, (flow, _, _, _) in active.items()}
    placed.rewired = rewire.apply_edits(net, edits)
    # rule 7: same placement in every phase; include rules only when not in every phase
    rules = [] if set(active) == set(views) else [Rule(phase=p) for p in active]
    bottoms = [_bottom_blob(active, "a"), _bottom_blob(active, "b")]
    new_layers: list[Layer] = []
    if tiled is not None:
        side, tiles = tiled
        idx = 0 if side == "a" else 1
        tname = tile_name if tile_name and not _taken(net, tile_name) else unique_name(
            net, tile_name or f"{elt_name}_tile")
        tile = Layer(tname, "Tile", [bottoms[idx]], [tname], attrs={"axis": 1, "tiles": tiles},
                     param_field="tile_param", include=list(rules))
        bottoms[idx] = tname
        new_layers.append(tile)
        placed.tile, placed.tiled = tname, side
    attrs: dict[str, Any] = {"operation": operation}
    if coeff:
        attrs["coeff"] = [float(c) for c in coeff]
    new_layers.append(Layer(elt_name, "Eltwise", bottoms, [elt_name], attrs=attrs,
                            param_field="eltwise_param", include=list(rules)))
    for i, lay in enumerate(new_layers):
        net.insert(position + i, lay)
    _verify(net, active, a_spec, b_spec, elt_name, placed.tile, what)
    allowed = {(k[0], k[2]) for k in edits if k[1] == "bottom"}
    for phase, edges_before in before.items():
        bad = rewire.changed_edges(edges_before, rewire.edges(resolve(net, NetState(phase))),
                                   allowed)
        if bad:  # pragma: no cover - rules 1, 2 and 5 keep every other edge
            raise NetError(f"{what}: rewiring changed what other layers read in the {phase} "
                           "net; use --no-rewire")
    return placed


def _taken(net: Net, name: str) -> bool:
    return any(lay.name == name or name in lay.tops for lay in net.layers)


def _bottom_blob(active: dict[str, tuple[Dataflow, Any, Value, Value]], side: str) -> str:
    names = {(va if side == "a" else vb).name for _, _, va, vb in active.values()}
    if len(names) != 1:  # pragma: no cover - twins always share a top name in practice
        raise NetError(f"the bottom resolves to different blobs per phase: {sorted(names)}")
    return names.pop()


def _check_consistent(plans: dict[str, dict[tuple[int, str, int], tuple[Layer, str]]],
                      phase_flows: dict[str, Dataflow], what: str) -> None:
    """A layer in several phases must get the same edits in each (layers are shared)."""
    members = {p: {id(n.layer) for n in f.nodes} for p, f in phase_flows.items()}
    for p, plan in plans.items():
        for q, other in plans.items():
            if p >= q:
                continue
            for key, (layer, _) in {**plan, **other}.items():
                if id(layer) not in members[p] or id(layer) not in members[q]:
                    continue
                if plan.get(key, (None, None))[1] != other.get(key, (None, None))[1]:
                    raise NetError(
                        f"{what}: layer {layer.name!r} would be rewired in the {p} net but not "
                        f"in the {q} net (or differently); the phases disagree on where the "
                        "bottoms are produced. Insert on a net with one phase"
                    )


def _verify(net: Net, active: dict[str, Any], a_spec: str, b_spec: str, elt: str,
            tile: str | None, what: str) -> None:
    """The Eltwise reads exactly the intended values in each phase (rule 5's no-cycle proof)."""
    for phase, (_, _, va, vb) in active.items():
        try:
            flow = resolve(net, NetState(phase))
        except NetError as exc:
            raise NetError(f"{what}: rewiring would create a cycle or a dangling bottom: "
                           f"{exc}") from None
        node = flow.node(elt)
        got = []
        for v in node.inputs:
            if tile is not None and v.producer.layer.name == tile:
                v = v.producer.inputs[0]
            got.append((v.producer.layer.name, v.top_index))
        want = [(va.producer.layer.name, va.top_index), (vb.producer.layer.name, vb.top_index)]
        if got != want:  # pragma: no cover - guarded by rule 2
            raise NetError(f"{what}: after rewiring the Eltwise reads {got}, not {want} "
                           f"({a_spec!r}, {b_spec!r}) in the {phase} net: a cycle")


# -- public ops -------------------------------------------------------------------------------
def insert_eltwise(
    net: Net,
    bottoms: tuple[str, str] | list[str],
    operation: str = "prod",
    coeff: list[float] | tuple[float, ...] | None = None,
    name: str | None = None,
    *,
    feed: list[str] | tuple[str, ...] | None = None,
    rewire: bool = True,
    input_shapes: dict[str, Any] | None = None,
) -> tuple[Net, Report]:
    """Add an ``Eltwise`` layer on two values and send the product to the next layers.

    Bottoms are named as the module docstring says: ``LAYER`` (its own output, before any
    in-place layer), ``LAYER:i``, or a blob name (its last version).

    Rules:

    1. The Eltwise goes right after the later of the two producers (in net order, the latest
       over all phases), so both values exist when it runs. When a consumer it takes over
       (rule 5) comes earlier in the file than that producer (HED's side outputs are written
       after the whole trunk), the producers' ancestors sitting at or after that consumer move
       up to just before it, in their order; the move must not change what any layer reads.
    2. Neither value may be overwritten in place between its producer and the Eltwise: Caffe
       keeps no copy. When the overwriting layer feeds the other bottom, rewiring it would
       create a cycle; either way it is an error that says which layer to name instead.
    3. The bottoms must have identical shapes (Eltwise does not broadcast), else
       :class:`ShapeMismatchError` showing both shapes.
    4. Except 1 channel against C channels with equal N and spatial axes: a ``Tile`` layer
       (``axis: 1``, ``tiles: C``) is inserted on the 1-channel bottom and reported.
    5. The product takes over the consumers of the *feature* bottom, the one whose shape the
       product has (the C-channel map, not a tiled 1-channel mask; A when the shapes are
       equal): every reader of that value reads the Eltwise's output instead, except readers
       that feed the other bottom (a cycle; reported as kept). An in-place reader (a ReLU on
       it) is continued: its top and its readers follow the new blob. ``feed`` names the
       consumers instead (layer names; each must read the feature value); ``rewire=False``
       takes over none (the product is a new net output). Each rewired consumer is reported,
       and every other layer is checked to read exactly what it read before.
    6. The Eltwise is named ``name`` (default ``<A blob>_<operation>``, made unique); its top
       has the same name. A given ``name`` that exists is an error.
    7. train_val nets: the same placement and rewiring in TRAIN and TEST; a layer in both
       phases must be rewired identically. The new layers get an ``include { phase }`` rule
       only when the bottoms exist in just one phase.
    8. When the bottoms' shapes are unknown in every phase (a data layer whose shape the
       definition does not give, and no ``input_shapes``), the op goes on unchecked only when
       the definition shows equal channel counts (``num_output`` up the chain); otherwise
       (a Tile may be needed) :class:`ShapeMismatchError` names the input shapes to give.

    Args:
        net: the net (not modified).
        bottoms: the two values ``(A, B)``.
        operation: ``"prod"``, ``"sum"`` or ``"max"``.
        coeff: one coefficient per bottom, SUM only.
        name: the new layer's name.
        feed: the consumers to take over (rule 5); default: all that can.
        rewire: False to take over no consumer (rule 5).
        input_shapes: shapes of input/data tops by name; the others are what ``surgery info``
            infers (:func:`surgery.shapes.starting_shapes`).

    Returns:
        ``(new net, report)``; ``report.data`` holds ``eltwise``, ``tile``, ``feature``,
        ``rewired`` (consumer names), ``moved``, ``position`` and the bottoms' ``shapes`` per
        phase.

    Raises:
        LayerNotFoundError: a bottom names no layer and no blob (with a did-you-mean).
        ShapeMismatchError: the bottoms' shapes differ (rule 3), or are unknown and may
            need a Tile (rule 8).
        NetError: bad operation/coeff, a bottom overwritten in place or a cycle (rule 2), a
            taken name, or a result Caffe would refuse.
    """
    op = _operation(operation)
    bottoms = list(bottoms)
    if len(bottoms) != 2:
        raise NetError(f"insert_eltwise takes two bottoms (A B), got {len(bottoms)}: {bottoms}")
    if coeff is not None and len(coeff) > 0:
        if op != "SUM":
            raise NetError(
                f"coeff is only allowed for operation sum (Caffe refuses it for {op.lower()}); "
                "drop --coeff or use --operation sum"
            )
        if len(coeff) != 2:
            raise NetError(f"coeff needs one value per bottom (2), got {len(coeff)}: {coeff}")
    out = net.copy()
    placed = _place_eltwise(out, bottoms[0], bottoms[1], op, list(coeff or []) or None, name,
                            None, "insert_eltwise", _feed(feed), rewire, input_shapes)
    report = Report("insert_eltwise")
    report.change(placed.eltwise, f"new Eltwise {op} on {bottoms[0]!r} and {bottoms[1]!r}",
                  position=placed.position)
    _report_common(report, placed, bottoms)
    return finish(out, report)


def _feed(feed: list[str] | tuple[str, ...] | str | None) -> list[str] | None:
    if feed is None:
        return None
    items = [feed] if isinstance(feed, str) else list(feed)
    names = [n for item in items for n in str(item).split(",") if n]
    if not names:
        raise NetError("feed names no layer; give LAYER[,LAYER] or drop it")
    return names


def _operation(operation: str) -> str:
    op = OPERATIONS.get(str(operation).lower())
    if op is None:
        raise NetError(f"operation must be one of {', '.join(OPERATIONS)}, got {operation!r}")
    return op


def _report_common(report: Report, placed: _Placed, bottoms: list[str],
                   new: tuple[str, ...] = ()) -> None:
    if placed.tile:
        side = bottoms[0] if placed.tiled == "a" else bottoms[1]
        shapes = next((s for s in placed.shapes.values() if s["a"] is not None), None)
        detail = (f" ({_fmt(shapes['a'])} x {_fmt(shapes['b'])})" if shapes else "")
        report.change(placed.tile, f"new Tile on {side!r}: 1 channel repeated to match the "
                      f"other bottom{detail}")
    if placed.moved:
        report.change(placed.moved[0] if len(placed.moved) == 1 else None,
                      f"moved up so the product exists before its consumers: "
                      f"{', '.join(placed.moved)}", moved=list(placed.moved))
    feature = bottoms[0] if placed.feature == "a" else bottoms[1]
    for r in placed.rewired:
        tail = f" (reads the product {placed.eltwise!r})" if r["what"].startswith("bottom") else ""
        report.change(r["layer"], f"rewired {r['what']}{tail}")
    for k in placed.kept:
        if k["layer"] not in new:
            report.leave(k["layer"], k["why"])
    consumers = list(dict.fromkeys(r["layer"] for r in placed.rewired))
    if consumers:
        report.note(f"the product {placed.eltwise!r} takes over the consumers of {feature!r} "
                    f"(the bottom whose shape it has): {', '.join(consumers)}")
    else:
        report.note(f"no layer reads the product: {placed.eltwise!r} is a net output")
    if all(s["a"] is None or s["b"] is None for s in placed.shapes.values()):
        report.note("bottom shapes unknown (no input shape): not checked; no Tile inserted")
    report.data.update(
        eltwise=placed.eltwise,
        tile=placed.tile,
        position=placed.position,
        phases=placed.phases,
        feature=feature,
        rewired=consumers,
        moved=list(placed.moved),
        shapes={p: {k: None if v is None else list(v) for k, v in s.items()}
                for p, s in placed.shapes.items()},
    )


def insert_gate(
    net: Net,
    at: str,
    channels: int | str = 1,
    activation: str = "sigmoid",
    init: str = "random",
    *,
    name: str | None = None,
    rng: np.random.Generator | None = None,
    seed: int | None = None,
    feed: list[str] | tuple[str, ...] | None = None,
    rewire: bool = True,
    input_shapes: dict[str, Any] | None = None,
) -> tuple[Net, Report]:
    """Add a learned multiplicative gate after ``at``'s own output.

    ``at`` is named as for :func:`insert_eltwise` (``LAYER`` = its own output, before any
    in-place layer; name the in-place layer, e.g. ``relu1``, to gate after it).

    Rules:

    1. New layers, placed right after ``at``'s producer: ``<L>_gate`` a 1x1 Convolution of
       ``at`` (an InnerProduct when ``at`` is 2-D, N x C) with ``channels`` outputs (1, or
       ``"same"`` = C) and explicit fillers
       (``init="random"``: weight msra, bias constant 0; ``init="identity"``: weight constant 0,
       bias constant b, so a fresh Caffe init is the identity too); ``<L>_gate_sigmoid`` an
       in-place Sigmoid (``activation="sigmoid"``); ``<L>_gate_tile`` a Tile to C channels
       when ``channels=1``; ``<L>_gated`` an Eltwise PROD of ``at`` and the gate. ``L`` is
       ``name`` or the layer's name; names are made unique. The gate gets Caffe's customary
       multipliers (weight lr_mult 1 decay_mult 1, bias lr_mult 2 decay_mult 0), reported.
    2. Every reader of ``at`` (except the gate) reads ``<L>_gated`` (an in-place ReLU after
       ``at`` is continued on the new blob), exactly as :func:`insert_eltwise`'s rule 5, in all
       phases; ``feed`` names the consumers instead, ``rewire=False`` takes over none.
    3. With weights loaded (``net.has_weights``), the gate's blobs are written:
       ``random`` draws from the fillers with ``rng``/``seed`` (reported; never all zero);
       ``identity`` writes weight 0 and bias b with b = 40 for sigmoid (sigmoid(40) is exactly
       1.0 in float32) and 1 without activation, so the gate is exactly 1 and the net's
       outputs are unchanged. Every other layer keeps its arrays (the same objects).
    4. The channel count C comes from shape inference; unknown shapes are an error.

    Args:
        net: the net (not modified).
        at: the value to gate.
        channels: 1 (one gate map, tiled) or ``"same"`` (one gate per channel).
        activation: ``"sigmoid"`` or ``"none"``.
        init: ``"random"`` or ``"identity"``.
        name: prefix for the new layers (default: the layer's name).
        rng: generator for random weights (wins over ``seed``).
        seed: seed for random weights (default :data:`surgery.fillers.DEFAULT_SEED`).
        feed: the consumers to take over (rule 2); default: all.
        rewire: False to take over no consumer (rule 2).
        input_shapes: shapes of input/data tops by name (rule 4).

    Returns:
        ``(new net, report)``; ``report.data`` lists ``layers``, ``channels``, ``init`` and the
        rewiring.

    Raises:
        LayerNotFoundError: ``at`` names no layer and no blob (with a did-you-mean).
        NetError: bad option values, unknown shapes, ``at`` not found in any phase, or a result
            Caffe would refuse.
    """
    if str(channels).lower() not in ("1", "same"):
        raise NetError(f"channels must be 1 or 'same', got {channels!r}")
    if activation not in ("sigmoid", "none"):
        raise NetError(f"activation must be 'sigmoid' or 'none', got {activation!r}")
    if init not in ("random", "identity"):
        raise NetError(f"init must be 'random' or 'identity', got {init!r}")
    out = net.copy()
    with_weights = net.has_weights
    views = _views(out, input_shapes)
    found: dict[str, tuple[Dataflow, Value, Any]] = {}
    for phase, (flow, info) in views.items():
        v = _resolve_edge(flow, out, at)
        if v is not None:
            found[phase] = (flow, v, info)
    if not found:
        raise NetError(f"insert_gate: {at!r} is not in any phase of the net")
    shape = next((s for s in (_shape(info, v) for _, v, info in found.values()) if s), None)
    if shape is None or len(shape) < 2:
        raise NetError(
            f"insert_gate: cannot infer the shape of {at!r} ({_fmt(shape)}), so the gate's "
            "channel count is unknown; give the net an input shape (an Input layer, or "
            "--input-shape BLOB=N,C,H,W)"
        )
    c = int(shape[1])
    n_out = c if str(channels).lower() == "same" else 1
    v0 = next(iter(found.values()))[1]
    blob = v0.name
    base = name or v0.producer.layer.name
    conv_name = unique_name(out, f"{base}_gate")
    sig_name = unique_name(out, f"{base}_gate_sigmoid") if activation == "sigmoid" else None
    elt_name = unique_name(out, f"{base}_gated")
    tile_name = unique_name(out, f"{base}_gate_tile")
    bias = IDENTITY_SIGMOID_BIAS if activation == "sigmoid" else 1.0
    if init == "identity":
        wf: dict[str, Any] = {"type": "constant", "value": 0.0}
        bf: dict[str, Any] = {"type": "constant", "value": bias}
    else:
        wf, bf = {"type": "msra"}, {"type": "constant", "value": 0.0}
    rules = [] if set(found) == set(views) else [Rule(phase=p) for p in found]
    if len(shape) == 2:  # (N, C): no spatial axes, the 1x1 "convolution" is an InnerProduct
        kind, field_name = "InnerProduct", "inner_product_param"
        conv_attrs: dict[str, Any] = {"num_output": n_out}
        w_shape: tuple[int, ...] = (n_out, c)
    else:
        kind, field_name = "Convolution", "convolution_param"
        conv_attrs = {"num_output": n_out, "kernel_size": [1]}
        w_shape = (n_out, c) + (1,) * (len(shape) - 2)
    conv_attrs.update(weight_filler=wf, bias_filler=bf)
    conv = Layer(conv_name, kind, [blob], [conv_name], attrs=conv_attrs,
                 param_field=field_name, include=list(rules))
    mults = customary_mults(conv)
    position = 1 + max(v.producer.net_index for _, v, _ in found.values())
    out.insert(position, conv)
    b_spec = conv_name
    if sig_name is not None:
        out.insert(position + 1, Layer(sig_name, "Sigmoid", [conv_name], [conv_name],
                                       include=list(rules)))
        b_spec = sig_name
    report = Report("insert_gate")
    # the Eltwise's A is the same value `at` named, by layer + top index
    a_spec = f"{v0.producer.layer.name}:{v0.top_index}"
    placed = _place_eltwise(out, a_spec, b_spec, "PROD", None, elt_name, tile_name,
                            "insert_gate", _feed(feed), rewire, input_shapes)
    new = [conv_name] + ([sig_name] if sig_name else []) + (
        [placed.tile] if placed.tile else []) + [elt_name]
    report.change(conv_name, f"new 1x1 {kind} {c} -> {n_out} channel(s) on {blob!r} "
                  f"({init} init)", position=position)
    if mults:
        report.change(conv_name, mults)
    if sig_name:
        report.change(sig_name, f"new in-place Sigmoid on {conv_name!r}")
    report.change(elt_name, f"new Eltwise PROD of {blob!r} and the gate")
    _report_common(report, placed, [at, b_spec], tuple(new))
    if with_weights:
        b_shape = (n_out,)
        if init == "identity":
            w = freeze_array(np.zeros(w_shape, np.float32))
            b = freeze_array(np.full(b_shape, bias, np.float32))
        else:
            from ..fillers import fill

            gen, used_seed = make_rng(seed, rng)
            report.seed = used_seed
            w = fill(wf, w_shape, gen)
            b = fill(bf, b_shape, gen)
            if not np.any(w):  # pragma: no cover - msra draws are never all zero
                raise NetError("insert_gate: the random gate weights came out all zero")
        for lay in out.layers_named(conv_name):
            lay.params = [replace(p, data=x) for p, x in zip(lay.params, (w, b), strict=True)]
        report.change(conv_name, f"weights written: {init} (weight {w_shape}, bias {b_shape})")
    else:
        report.note("no weights loaded: the gate's blobs come from its fillers when Caffe "
                    "initialises the net")
    if init == "identity":
        report.note(
            f"identity gate: weight 0, bias {bias:g}, so the gate is exactly 1.0 and outputs "
            "are unchanged"
            + ("; the sigmoid is saturated at the start (gradient ~4e-18), so the gate learns "
               "slowly -- use activation none for a gate that trains from the identity"
               if activation == "sigmoid" else "")
        )
    report.data.update(layers=new, channels=n_out, in_channels=c, init=init,
                       activation=activation, bias=bias if init == "identity" else 0.0)
    return finish(out, report)

