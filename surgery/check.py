"""``check(net)``: find what Caffe would refuse, before it does.

Cases (each problem names the layer and says how to fix it):

1. A layer with both include and exclude rules.
2. In each default state (TRAIN and TEST): an unknown bottom, or a top produced by multiple
   sources (Caffe's ``Net::Init``).
3. BatchNorm with a ``param`` whose lr_mult is not 0 (Caffe refuses to learn BN statistics).
4. More ``param { }`` entries than the layer has learnable blobs.
5. Shapes that cannot be computed (mismatched Eltwise/Concat bottoms, kernel larger than the
   input...), and loaded weights whose shape differs from what the definition implies.
6. Two layers with the same name in one phase (weights are matched by name).
7. Fields our schema does not know (a fork's), kept verbatim: a warning each, since what
   they mean is unknown (exports refuse the layer; see :func:`verbatim_problems`).
8. An lr_mult or decay_mult that is not a finite number (nan, inf).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from .dataflow import resolve
from .errors import NetError, SurgeryError
from .net import Net, NetState

__all__ = ["Problem", "check", "assert_valid", "inference_problems", "verbatim_problems"]


@dataclass(frozen=True)
class Problem:
    """One finding. ``severity`` is ``"error"`` (Caffe refuses) or ``"warning"``."""

    severity: str
    layer: str | None
    message: str
    phase: str | None = None

    def __str__(self) -> str:
        where = f"layer {self.layer!r}: " if self.layer else ""
        phase = f" [{self.phase}]" if self.phase else ""
        return f"{self.severity}{phase}: {where}{self.message}"

    def as_dict(self) -> dict[str, str | None]:
        return asdict(self)


def default_states(net: Net) -> tuple[NetState, ...]:
    """The states :func:`check` instantiates: TEST and TRAIN, a phase whose layers are gated by
    ``stage`` include rules once per such stage set instead of with no stage.

    Caffe's ``mnist_autoencoder.prototxt`` has its TEST data layers only under the stages
    ``test-on-train`` / ``test-on-test`` (the solver's ``test_state`` picks one): with no stage
    its TEST net has no data, yet the definition is valid.
    """
    out: list[NetState] = []
    for phase in ("TEST", "TRAIN"):
        staged: list[tuple[str, ...]] = []
        for lay in net.layers:
            for rule in lay.include:
                if rule.stage and rule.phase in (None, phase) and tuple(rule.stage) not in staged:
                    staged.append(tuple(rule.stage))
        out += [NetState(phase, stages=st) for st in staged] or [NetState(phase)]
    return tuple(out)


def check(net: Net, states: tuple[NetState, ...] | None = None) -> list[Problem]:
    """Every problem Caffe would report for ``net`` (empty list when it is valid).

    Args:
        net: the net to lint.
        states: the states to instantiate (default: :func:`default_states`).
    """
    from .shapes import infer  # local: keeps `import surgery.check` light

    problems: list[Problem] = verbatim_problems(net)  # case 7
    both_rules = False
    for lay in net.layers:  # case 1
        if lay.include and lay.exclude:
            both_rules = True
            problems.append(
                Problem("error", lay.name, "has both include and exclude rules; keep only one")
            )
        for i, p in enumerate(lay.params):  # case 8
            for what, v in (("lr_mult", p.lr_mult), ("decay_mult", p.decay_mult)):
                if v is not None and not math.isfinite(v):
                    problems.append(Problem("error", lay.name, f"param {i} has {what} {v}; "
                                            "it must be a finite number"))
        if lay.type == "BatchNorm":  # case 3
            for i, p in enumerate(lay.params):
                if p.lr_mult is not None and p.lr_mult != 0:
                    problems.append(
                        Problem(
                            "error",
                            lay.name,
                            f"BatchNorm param {i} has lr_mult {p.lr_mult:g}; Caffe requires 0 "
                            "(its statistics are not learned). Set lr_mult: 0 or remove the "
                            "param entries",
                        )
                    )
    if both_rules:  # resolve() would stop at the first such layer; case 1 named them all
        return problems
    seen_param_errors: set[tuple[str, int]] = set()
    for state in states or default_states(net):
        try:
            flow = resolve(net, state)
        except NetError as exc:  # case 2
            problems.append(Problem("error", None, str(exc), state.phase))
            continue
        names: dict[str, int] = {}
        for node in flow.nodes:  # case 6
            names[node.layer.name] = names.get(node.layer.name, 0) + 1
        for name, count in names.items():
            if count > 1:
                problems.append(
                    Problem(
                        "warning",
                        name,
                        f"{count} layers share this name in one phase; weights are matched by "
                        "name, so give each a unique name",
                        state.phase,
                    )
                )
        try:
            info = infer(flow)
        except SurgeryError as exc:  # case 5
            problems.append(Problem("error", None, str(exc), state.phase))
            continue
        for node in flow.nodes:
            lay = node.layer
            if node not in info.node_params:  # bottoms' shapes unknown
                continue
            want = info.params(node)
            key = (lay.name, id(lay))
            declared = sum(1 for p in lay.params if p.declared)
            if declared > len(want) and key not in seen_param_errors:  # case 4
                seen_param_errors.add(key)
                problems.append(
                    Problem(
                        "error",
                        lay.name,
                        f"{declared} param entries but {lay.type} has {len(want)} learnable "
                        f"blob(s); remove the extra param {{ }} entries",
                        state.phase,
                    )
                )
            for i, (p, shape) in enumerate(zip(lay.params, want, strict=False)):  # case 5
                if p.data is None or shape is None or (lay.name, i) in seen_param_errors:
                    continue
                if tuple(p.data.shape) != tuple(shape) and not (
                    p.data.size == int(np.prod(shape)) and p.data.ndim == 4
                ):
                    seen_param_errors.add((lay.name, i))
                    problems.append(
                        Problem(
                            "error",
                            lay.name,
                            f"blob {i} has shape {tuple(p.data.shape)} but the definition "
                            f"implies {tuple(shape)}; rename the layer to re-learn it, or fix "
                            "num_output/kernel settings",
                            state.phase,
                        )
                    )
    return problems


def inference_problems(net: Net) -> dict[str, str]:
    """What ``surgery info`` would refuse, per phase: shape inference from the shapes every
    verb starts from (:func:`surgery.shapes.starting_shapes`: dataset layers' shapes read off
    the definition), without comparing loaded weights.

    :func:`check` infers only what the definition states, so a train_val net whose data layer
    hides its shape passes it even when, say, an Accuracy ``top_k`` exceeds the class count;
    this finds such problems the way ``info`` (and Caffe at run time) does.

    Returns:
        ``{phase: error message}`` for each phase that resolves but does not infer.
    """
    from .shapes import infer, starting_shapes

    out: dict[str, str] = {}
    for phase in ("TEST", "TRAIN"):
        try:
            flow = resolve(net, NetState(phase))
        except SurgeryError:
            continue
        try:
            start, _ = starting_shapes(flow)
            infer(flow, start, check_weights=False)
        except SurgeryError as exc:
            out[phase] = str(exc)
    return out


def verbatim_problems(net: Net) -> list[Problem]:
    """One warning per field our schema does not know (:attr:`~surgery.net.Layer.verbatim`):
    kept as written, written back unchanged, never interpreted."""
    out = [
        Problem("warning", None, f"net-level field {v.dotted!r} ({v.where}) is not in our schema "
                "(a Caffe fork's?): kept verbatim and written back unchanged")
        for v in net.verbatim
    ]
    for lay in net.layers:
        for v in lay.verbatim:
            out.append(Problem(
                "warning", lay.name,
                f"field {v.dotted!r} ({v.where}) is not in our schema (a Caffe fork's?): kept "
                "verbatim and written back unchanged; exports refuse this layer, whose meaning "
                "it may change (data layers are not exported)",
            ))
    return out


def assert_valid(net: Net) -> None:
    """Raise :class:`NetError` listing every error :func:`check` finds.

    Raises:
        NetError: at least one error-severity problem.
    """
    errors = [p for p in check(net) if p.severity == "error"]
    if errors:
        raise NetError("; ".join(str(p) for p in errors))
