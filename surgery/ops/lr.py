"""Learning-rate multipliers: freeze, unfreeze and set ``param { lr_mult decay_mult }``.

Caffe reads one ``param { }`` entry per learnable blob, in blob order (weight, then bias); a
missing entry means lr_mult 1, decay_mult 1. Freezing a layer is lr_mult 0 on every blob.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from ..errors import SurgeryError
from ..net import Layer, Net, Param
from . import _common as C
from .report import Report

__all__ = ["freeze", "unfreeze", "set_lr", "multipliers"]

Mult = float | Sequence[float] | None


def multipliers(net: Net) -> dict[str, dict[str, Any]]:
    """Every learnable layer's effective multipliers, one entry per layer name.

    Returns:
        ``{name: {"type": str, "lr_mult": [per blob], "decay_mult": [per blob],
        "frozen": bool}}``.
    """
    out: dict[str, dict[str, Any]] = {}
    for lay in net.layers:
        n = C.learnable_count(lay)
        if n == 0 or lay.name in out:
            continue
        params = [lay.params[i] if i < len(lay.params) else Param() for i in range(n)]
        lr = [p.effective_lr_mult for p in params]
        out[lay.name] = {
            "type": lay.type,
            "lr_mult": lr,
            "decay_mult": [p.effective_decay_mult for p in params],
            "frozen": all(v == 0 for v in lr),
        }
    return out


def _values(v: Mult, what: str) -> tuple[float, ...] | None:
    if v is None:
        return None
    if isinstance(v, bool):
        raise SurgeryError(f"{what} must be a number or W,B; got {v!r}")
    if isinstance(v, (int, float)):
        vals: tuple[float, ...] = (float(v),)
    else:
        try:
            vals = tuple(float(x) for x in v)
        except (TypeError, ValueError):
            raise SurgeryError(f"{what} must be a number or W,B; got {v!r}") from None
    if not vals or any(x < 0 for x in vals):
        raise SurgeryError(f"{what} must be non-negative numbers (W or W,B); got {v!r}")
    return vals


def _per_blob(vals: tuple[float, ...], n: int) -> list[float]:
    # one value: every blob; W,B: blob 0 gets W, the others B
    if len(vals) == 1:
        return [vals[0]] * n
    return [vals[0]] + [vals[min(i, len(vals) - 1)] for i in range(1, n)]


def _select(
    net: Net,
    until: Iterable[str] | str | None,
    layers: Iterable[str] | str | None,
    except_: Iterable[str] | str | None,
    verb: str,
) -> tuple[list[str], list[str]]:
    """Names selected (net order) and how they were chosen (for the report)."""
    if until is None and layers is None:
        raise SurgeryError(
            f"{verb}: say which layers: --until LAYER (it and everything it depends on) or "
            "--layers GLOB ..."
        )
    chosen: set[str] = set()
    how: list[str] = []
    if until is not None:
        targets = [until] if isinstance(until, str) else list(until)
        phase_flows = list(C.flows(net).values())  # resolved once for every --until target
        for name in C.match_globs(net, targets, what="--until"):
            found = False
            for flow in phase_flows:
                node = next((n for n in flow.nodes if n.layer.name == name), None)
                if node is None:
                    continue
                found = True
                chosen.update(a.layer.name for a in flow.ancestors(node))
            if not found:
                raise SurgeryError(
                    f"--until: layer {name!r} is in neither the TRAIN nor the TEST net"
                )
            how.append(f"--until {name}")
    if layers is not None:
        chosen.update(C.match_globs(net, layers, what="--layers"))
        how.append("--layers " + " ".join([layers] if isinstance(layers, str) else layers))
    if except_ is not None:
        dropped = set(C.match_globs(net, except_, what="--except"))
        chosen -= dropped
        how.append("--except " + " ".join([except_] if isinstance(except_, str) else except_))
    order = list(dict.fromkeys(lay.name for lay in net.layers))
    return [n for n in order if n in chosen], how


def _apply(
    net: Net,
    names: list[str],
    report: Report,
    lr: tuple[float, ...] | None,
    decay: tuple[float, ...] | None,
    *,
    only_frozen: bool = False,
    bn_stats: bool | None = None,
) -> None:
    """Set multipliers on ``names`` (their learnable blobs), keep shared params consistent.

    ``bn_stats``: True writes ``use_global_stats: true`` on the BatchNorm layers among
    ``names``, False removes it (Caffe's default), None leaves them (reported)."""
    shared: dict[str, tuple[float | None, float | None]] = {}
    touched = 0
    named = net.by_name()
    for name in names:
        twins = named.get(name, [])
        n = C.learnable_count(twins[0])
        if n == 0:
            continue
        if twins[0].type == "BatchNorm":
            _bn_stats(twins, report, bn_stats)
            continue
        first = twins[0]
        before = _fmt(first, n)
        if only_frozen and not any(_blob(first, i).effective_lr_mult == 0 for i in range(n)):
            report.leave(name, f"already trainable ({before})")
            continue
        for lay in twins:
            C.ensure_params(lay, n)
            for i in range(n):
                p = lay.params[i]
                if only_frozen and p.effective_lr_mult != 0:
                    continue
                if lr is not None:
                    p.lr_mult = _per_blob(lr, n)[i]
                if decay is not None:
                    p.decay_mult = _per_blob(decay, n)[i]
                p.declared = True
                if p.name:
                    shared[p.name] = (p.lr_mult, p.decay_mult)
        after = _fmt(first, n)
        touched += 1
        if after != before:
            report.change(name, f"lr/decay {before} -> {after}")
        else:
            report.leave(name, f"already {after}")
    for pname, (lr_v, dc_v) in shared.items():  # shared params stay consistent
        others = []
        for lay in net.layers:
            for p in lay.params:
                if p.name == pname and (p.lr_mult, p.decay_mult) != (lr_v, dc_v):
                    p.lr_mult, p.decay_mult, p.declared = lr_v, dc_v, True
                    if lay.name not in others:
                        others.append(lay.name)
        if others:
            for o in others:
                report.change(o, f"shared param {pname!r} set to the same multipliers")
            report.note(f"param {pname!r} is shared; also set on {', '.join(others)}")
    report.data["layers_selected"] = touched


def _bn_stats(twins: list[Layer], report: Report, bn_stats: bool | None) -> None:
    """Rule 4 of :func:`freeze` / rule 3 of :func:`unfreeze` for one BatchNorm layer."""
    name = twins[0].name
    if bn_stats is None:
        report.leave(name, "BatchNorm: Caffe requires lr_mult 0 on its statistics; left as is")
        return
    before = [lay.attrs.get("use_global_stats") for lay in twins]
    for lay in twins:
        if bn_stats:
            lay.attrs["use_global_stats"] = True
        else:
            lay.attrs.pop("use_global_stats", None)
    if bn_stats and before != [True] * len(twins):
        report.change(name, "use_global_stats: true (the stored statistics in TRAIN too, not "
                            "updated)")
    elif not bn_stats and any(b is not None for b in before):
        report.change(name, "use_global_stats removed (Caffe's default: the batch's "
                            "statistics in TRAIN, the stored ones in TEST)")
    else:
        report.leave(name, "BatchNorm: already " + ("use_global_stats: true" if bn_stats
                                                   else "without use_global_stats"))


def _blob(lay: Layer, i: int) -> Param:
    return lay.params[i] if i < len(lay.params) else Param()


def _fmt(lay: Layer, n: int) -> str:
    return " ".join(
        f"{_blob(lay, i).effective_lr_mult:g}/{_blob(lay, i).effective_decay_mult:g}"
        for i in range(n)
    )


def _finish(net: Net, report: Report) -> tuple[Net, Report]:
    report.data["multipliers"] = multipliers(net)
    return C.finish(net, report)


def freeze(
    net: Net,
    until: Iterable[str] | str | None = None,
    layers: Iterable[str] | str | None = None,
    except_: Iterable[str] | str | None = None,
    bn_stats: bool = False,
) -> tuple[Net, Report]:
    """Stop learning in part of a net: lr_mult 0 and decay_mult 0 on every learnable blob.

    Rules:

    1. Selection: ``until=LAYER`` is LAYER and every layer it depends on (its ancestors in the
       dataflow, union over TRAIN and TEST), so side branches such as GoogLeNet's auxiliary
       heads stay trainable; ``layers`` are names or globs; both may be given (union), and
       ``except_`` globs are removed from the selection. Each glob must match some layer.
    2. Selected layers without learnable blobs (ReLU, Pooling...) are ignored.
    3. Every learnable blob of a selected layer gets ``lr_mult: 0 decay_mult: 0``; ``param``
       entries are added as needed, one per blob (a Convolution with ``bias_term: false`` has
       one).
    4. BatchNorm's multipliers are left (Caffe requires lr_mult 0 on its statistics already),
       reported. Caffe still normalises with each *batch's* statistics in TRAIN and updates
       the stored ones, frozen or not, unless the layer says ``use_global_stats: true``;
       ``bn_stats=True`` writes that on the selected BatchNorm layers, so a frozen trunk keeps
       its statistics (they are then used in TRAIN too, and never updated).
    5. A shared param (``param { name }``) gets the same multipliers in every layer sharing
       it (reported).
    6. ``report.data["multipliers"]`` lists every learnable layer's resulting multipliers.

    Args:
        net: the net (not modified).
        until: the last layer to freeze, with everything it depends on.
        layers: names or globs of layers to freeze.
        except_: names or globs to keep trainable.
        bn_stats: also fix the selected BatchNorm layers' statistics (rule 4).

    Returns:
        ``(new net, report)``.

    Raises:
        SurgeryError: neither ``until`` nor ``layers`` given.
        LayerNotFoundError: a name or glob matches no layer (with a did-you-mean).
        NetError: the result is invalid.
    """
    report = Report("freeze")
    out = net.copy()
    names, how = _select(out, until, layers, except_, "freeze")
    report.note("selected by " + "; ".join(how))
    _apply(out, names, report, (0.0,), (0.0,), bn_stats=True if bn_stats else None)
    return _finish(out, report)


def unfreeze(
    net: Net,
    until: Iterable[str] | str | None = None,
    layers: Iterable[str] | str | None = None,
    except_: Iterable[str] | str | None = None,
    bn_stats: bool = False,
) -> tuple[Net, Report]:
    """Make frozen blobs learn again: the reverse of :func:`freeze`.

    Rules:

    1. Selection as in :func:`freeze` (rule 1); layers without learnable blobs are ignored.
    2. Every learnable blob with lr_mult 0 gets ``lr_mult: 1 decay_mult: 1`` written
       explicitly (Caffe's defaults); blobs already learning keep their values (so a bias at
       lr_mult 2 stays 2). Use :func:`set_lr` for other values, e.g. the usual bias 2/0.
    3. BatchNorm's multipliers are left (they must stay 0), reported; ``bn_stats=True``
       removes ``use_global_stats`` from the selected BatchNorm layers (the reverse of
       ``freeze(bn_stats=True)``): Caffe's default, the batch's statistics in TRAIN.
    4. Shared params stay consistent, as in :func:`freeze`.
    5. ``report.data["multipliers"]`` lists every learnable layer's resulting multipliers.

    Args:
        net: the net (not modified).
        until: the last layer to unfreeze, with everything it depends on.
        layers: names or globs.
        except_: names or globs to leave as they are.
        bn_stats: also return the selected BatchNorm layers to batch statistics (rule 3).

    Returns:
        ``(new net, report)``.

    Raises:
        SurgeryError: neither ``until`` nor ``layers`` given.
        LayerNotFoundError: a name or glob matches no layer.
        NetError: the result is invalid.
    """
    report = Report("unfreeze")
    out = net.copy()
    names, how = _select(out, until, layers, except_, "unfreeze")
    report.note("selected by " + "; ".join(how))
    _apply(out, names, report, (1.0,), (1.0,), only_frozen=True,
           bn_stats=False if bn_stats else None)
    return _finish(out, report)


def set_lr(
    net: Net,
    layers: Iterable[str] | str,
    lr_mult: Mult = None,
    decay_mult: Mult = None,
    except_: Iterable[str] | str | None = None,
) -> tuple[Net, Report]:
    """Set learning-rate and/or weight-decay multipliers on selected layers.

    Rules:

    1. ``layers`` are names or globs (each must match); ``except_`` globs are removed.
    2. A single value applies to every learnable blob; ``(W, B)`` gives blob 0 (the weight)
       W and the other blobs B -- the usual fine-tuning head is ``lr_mult=(10, 20)``,
       ``decay_mult=(1, 0)``. ``None`` leaves that multiplier as written.
    3. ``param`` entries are added as needed, one per learnable blob.
    4. BatchNorm is skipped and reported; shared params stay consistent (as in :func:`freeze`).
    5. ``report.data["multipliers"]`` lists every learnable layer's resulting multipliers.

    Args:
        net: the net (not modified).
        layers: names or globs.
        lr_mult: W or (W, B).
        decay_mult: W or (W, B).
        except_: names or globs to leave alone.

    Returns:
        ``(new net, report)``.

    Raises:
        SurgeryError: no multiplier given, or a negative or non-numeric one.
        LayerNotFoundError: a name or glob matches no layer.
        NetError: the result is invalid.
    """
    lr = _values(lr_mult, "lr_mult")
    decay = _values(decay_mult, "decay_mult")
    if lr is None and decay is None:
        raise SurgeryError("lr: give --lr-mult and/or --decay-mult")
    if layers is None:
        raise SurgeryError("lr: give --layers GLOB ...")
    report = Report("set_lr")
    out = net.copy()
    names, how = _select(out, None, layers, except_, "lr")
    report.note("selected by " + "; ".join(how))
    _apply(out, names, report, lr, decay)
    return _finish(out, report)
