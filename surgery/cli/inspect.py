"""CLI verbs that look at a net: info, upgrade."""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Sequence
from typing import Any

from . import (
    CliError,
    add_input_shape_option,
    emit,
    ensure_distinct,
    ensure_output,
    escape,
    input_shapes,
)

__all__ = ["register", "info_report", "info_text"]


# -- info -------------------------------------------------------------------------------------
def _fmt_shape(shape: Sequence[int] | None) -> str:
    return "?" if shape is None else "x".join(str(d) for d in shape) or "scalar"


def _fmt_mult(v: float) -> str:
    return f"{v:g}"


def info_report(
    net: Any, phase: str = "TEST", input_shapes: dict[str, tuple[int, ...]] | None = None
) -> dict[str, Any]:
    """The data behind ``surgery info``: layers, totals, upgrades and problems.

    Dataset layers get the shapes their parameters imply (reported as assumptions) unless
    ``input_shapes`` gives them.
    """
    import numpy as np

    from ..check import check, default_states
    from ..dataflow import implicit_splits, resolve
    from ..net import NetState
    from ..shapes import infer, starting_shapes

    # a phase whose layers are gated by stage rules (mnist_autoencoder's TEST data layers):
    # the first stage set, as a solver's test_state would give it
    state = next((st for st in default_states(net) if st.phase == phase.upper()),
                 NetState(phase))
    flow = resolve(net, state)
    start, guesses = starting_shapes(flow, input_shapes)
    assumptions = list(guesses.values())
    if state.stages:
        assumptions.insert(0, f"{state.phase} net with stage(s) {', '.join(state.stages)} "
                              "(layers are gated by stage rules)")
    info = infer(flow, start, check_weights=False)
    splits: dict[int, list[Any]] = {}
    for sp in implicit_splits(flow):
        splits.setdefault(id(sp.after), []).append(sp)
    layers = []
    total_params = 0
    total_macs = 0
    for node in flow.nodes:
        lay = node.layer
        shapes = info.params(node)
        params = []
        n_blobs = max(len(shapes), sum(1 for p in lay.params if p.data is not None))
        for i in range(n_blobs):
            p = lay.params[i] if i < len(lay.params) else None
            shape = (
                list(p.data.shape)
                if p is not None and p.data is not None
                else (list(shapes[i]) if i < len(shapes) and shapes[i] is not None else None)
            )
            if shape is not None:
                total_params += int(np.prod(shape))
            params.append(
                {
                    "shape": shape,
                    "lr_mult": 1.0 if p is None else p.effective_lr_mult,
                    "decay_mult": 1.0 if p is None else p.effective_decay_mult,
                    "loaded": p is not None and p.data is not None,
                }
            )
        macs = info.macs(node) or 0
        total_macs += macs
        layers.append(
            {
                "name": lay.name,
                "type": lay.type,
                "bottoms": list(lay.bottoms),
                "tops": list(lay.tops),
                "top_shapes": [None if s is None else list(s) for s in info.tops(node)],
                "params": params,
                "frozen": bool(params) and all(p["lr_mult"] == 0 for p in params),
                "macs": macs,
            }
        )
        for sp in splits.get(id(node), []):  # Caffe inserts these right after the producer
            shape = info.shape(sp.value)
            layers.append(
                {
                    "name": sp.name,
                    "type": "Split",
                    "implicit": True,
                    "bottoms": [sp.value.name],
                    "tops": list(sp.tops),
                    "top_shapes": [None if shape is None else list(shape)] * len(sp.tops),
                    "params": [],
                    "frozen": False,
                    "macs": 0,
                }
            )
    problems = [p.as_dict() for p in check(net)]
    return {
        "net": net.name,
        "source": net.source,
        "weights": net.weights_source,
        "phase": phase,
        "layers": layers,
        "outputs": [v.name for v in flow.outputs],
        "totals": {
            "layers": sum(1 for lay in layers if not lay.get("implicit")),
            "implicit_splits": sum(1 for lay in layers if lay.get("implicit")),
            "params": total_params,
            "macs": total_macs,
            "learnable_layers": sum(1 for lay in layers if lay["params"]),
            "frozen_layers": sum(1 for lay in layers if lay["frozen"]),
        },
        "upgrades": list(net.upgrades),
        "assumptions": assumptions,
        "problems": problems,
    }


#: Default width of the ``info`` table (``--wide`` lifts it).
TABLE_WIDTH = 100


def _shorten(text: str, width: int, at_end: bool = False) -> str:
    """``text`` cut to ``width`` characters, the cut marked with ``...`` in the middle (names
    differ at both ends: ``inception_4a/...reduce``) or ``at_end``."""
    if len(text) <= width:
        return text
    if width <= 3:
        return text[:width]
    if at_end:
        return text[: width - 3] + "..."
    head = (width - 3 + 1) // 2
    tail = width - 3 - head
    return text[:head] + "..." + (text[-tail:] if tail else "")


def _fit_widths(
    rows: Sequence[Sequence[str]], width: int, caps: Sequence[int]
) -> list[int]:
    """Column widths (2 spaces between columns) that fit ``width``.

    Each column's floor is the width that holds 90% of its cells (97% for the first column,
    the layer names), at most its cap, so only the odd long cell is cut. The other columns
    give way first, one character at a time from the one furthest above its floor; then the
    names; once every column is at its floor, the widest one.
    """
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    floors = []
    for i, cap in enumerate(caps):
        lengths = sorted(len(r[i]) for r in rows)
        share = 97 if i == 0 else 90
        floors.append(min(lengths[(len(lengths) - 1) * share // 100], cap))
    while sum(widths) + 2 * (len(widths) - 1) > width:
        over = [w - f for w, f in zip(widths, floors, strict=True)]
        i = max(range(1, len(widths)), key=lambda k: (over[k], widths[k]))
        if over[i] <= 0:
            i = 0 if over[0] > 0 else max(range(len(widths)), key=lambda k: widths[k])
        if widths[i] <= 4:
            break
        widths[i] -= 1
    return widths


#: Most room a column's floor may claim in the compact table (see :func:`_fit_widths`).
_CAPS = (26, 11, 20, 13, 20)


def _flow_cell(lay: dict[str, Any]) -> str:
    """``bottoms -> tops`` for the compact table: tops left out where the only top is the
    layer's own name, ``(in place)`` for a layer writing its bottoms (``--wide`` names them),
    a count for Splits."""
    bottoms = ",".join(lay["bottoms"]) or "-"
    tops = lay["tops"]
    if lay.get("implicit"):
        return f"{bottoms} -> {len(tops)} tops"
    if tops and tops == lay["bottoms"]:
        return "(in place)"
    if tops == [lay["name"]]:
        return bottoms
    return f"{bottoms} -> {','.join(tops) or '-'}"


def _same_shapes(shapes: Sequence[Any]) -> str:
    texts = [_fmt_shape(s) for s in shapes]
    if len(texts) > 1 and len(set(texts)) == 1:
        return f"{texts[0]} (x{len(texts)})"
    return " ".join(texts) or "-"


def info_text(rep: dict[str, Any], wide: bool = False, width: int = TABLE_WIDTH) -> str:
    """The ``surgery info`` report as text.

    Args:
        rep: :func:`info_report`'s dict.
        wide: print every name in full (lines as long as they need); otherwise the table fits
            ``width`` columns: implicit Split tops are counted rather than listed, equal top
            shapes written once, and long cells cut in the middle with ``...``.
        width: the width the compact table fits.
    """
    rows = [("layer", "type", "bottoms -> tops", "top shapes", "learnable blobs (lr/decay)")]
    for lay in rep["layers"]:
        fmt = "{} ({}/{})" if wide else "{} {}/{}"
        blobs = ", ".join(
            fmt.format(_fmt_shape(p["shape"]), _fmt_mult(p["lr_mult"]), _fmt_mult(p["decay_mult"]))
            for p in lay["params"]
        )
        if lay["frozen"]:
            blobs += "  [frozen]"
        implicit = bool(lay.get("implicit"))
        if wide:
            rows.append(
                (
                    lay["name"],
                    lay["type"] + (" (implicit)" if implicit else ""),
                    f"{','.join(lay['bottoms']) or '-'} -> {','.join(lay['tops']) or '-'}",
                    " ".join(_fmt_shape(s) for s in lay["top_shapes"]) or "-",
                    blobs or "-",
                )
            )
        else:
            rows.append(
                (
                    lay["name"],
                    lay["type"] + ("*" if implicit else ""),
                    _flow_cell(lay),
                    _same_shapes(lay["top_shapes"][:1] if implicit else lay["top_shapes"]),
                    blobs or "-",
                )
            )
    rows = [tuple(escape(c) for c in r) for r in rows]  # names come from the file
    if wide:
        widths = [min(max(len(r[i]) for r in rows), 48) for i in range(4)]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4]
            for r in rows
        ]
    else:
        rows[0] = ("layer", "type", "bottoms [-> tops]", "top shapes", "learnable (lr/decay)")
        widths = _fit_widths(rows, width, _CAPS)
        lines = [
            "  ".join(
                _shorten(c, w, at_end=i == len(r) - 1).ljust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            ).rstrip()
            for r in rows
        ]
    t = rep["totals"]
    tail = [
        f"{rep['phase']} net {rep['net']!r}: {t['layers']} layers, {t['params']:,} parameters, "
        f"{t['macs']:,} multiply-adds per forward pass, {t['frozen_layers']}/"
        f"{t['learnable_layers']} learnable layers frozen; outputs: {', '.join(rep['outputs'])}"
    ]
    if t.get("implicit_splits") and not wide:
        tail.append(f"Split*: the {t['implicit_splits']} Split layers Caffe inserts for blobs "
                    "read more than once (tops counted; --wide lists them)")
    if not wide:
        tail.append("bottoms [-> tops]: tops shown only where they are not the layer's own name; "
                    "(in place): the layer overwrites its bottoms")
    for u in rep["upgrades"]:
        tail.append(f"upgrade: {u}")
    for a in rep["assumptions"]:
        tail.append(f"assumed: {a}")
    for p in rep["problems"]:
        where = f"layer {p['layer']!r}: " if p["layer"] else ""
        phase = f" [{p['phase']}]" if p["phase"] else ""
        tail.append(f"{p['severity']}{phase}: {where}{p['message']}")
    if not rep["problems"]:
        tail.append("check: no problems found")
    # Names come from the file: no terminal escapes, one row per layer whatever they hold.
    tail = [escape(line) for line in tail]
    if not wide:
        tail = [
            textwrap.fill(line, width, subsequent_indent="  ", break_long_words=False,
                          break_on_hyphens=False)
            for line in tail
        ]
    return "\n".join([*lines, "", *tail])


def cmd_info(args: argparse.Namespace) -> int:
    from ..caffe_io import load

    net = load(args.net, args.weights)
    phase = args.phase.upper()
    rep = info_report(net, phase, input_shapes(net, args.input_shape, phase))
    emit(rep, info_text(rep, wide=args.wide), args.json)
    return 0


# -- upgrade ----------------------------------------------------------------------------------
def cmd_upgrade(args: argparse.Namespace) -> int:
    from ..caffe_io import load, save

    ensure_output([args.net, args.weights], args.output, args.in_place)
    ensure_output([args.net, args.weights], args.out_weights, args.in_place, "--out-weights")
    if args.weights and not args.out_weights:
        raise CliError("--weights needs --out-weights (where to write the upgraded caffemodel)")
    if args.out_weights and not args.weights:
        raise CliError("--out-weights needs --weights (the legacy caffemodel to upgrade)")
    ensure_distinct(args.output, args.out_weights, "-o and --out-weights")
    net = load(args.net, args.weights)
    from ..check import assert_valid

    assert_valid(net)  # the README's promise: every output passes check
    save(net, args.output, args.out_weights)
    rep = {
        "output": args.output,
        "out_weights": args.out_weights,
        "upgrades": net.upgrades,
    }
    text = "\n".join(f"upgrade: {u}" for u in net.upgrades) or "already in the current format"
    text += f"\nwrote {args.output}" + (f" and {args.out_weights}" if args.out_weights else "")
    emit(rep, text, args.json)
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("info", help="layers, shapes, params, lr multipliers, problems")
    p.add_argument("net", help="NET.prototxt")
    p.add_argument("--weights", help="W.caffemodel")
    p.add_argument("--phase", default="test", choices=["train", "test", "TRAIN", "TEST"])
    add_input_shape_option(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--wide", action="store_true",
        help=f"print every name and implicit Split top in full (default: fit {TABLE_WIDTH} "
        "columns, long cells cut with '...')",
    )
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("upgrade", help="rewrite a legacy V0/V1 definition (and weights) as V2")
    p.add_argument("net", help="OLD.prototxt")
    p.add_argument("-o", "--output", required=True, help="NEW.prototxt")
    p.add_argument("--weights", help="OLD.caffemodel")
    p.add_argument("--out-weights", help="NEW.caffemodel")
    p.add_argument("--in-place", action="store_true", help="allow overwriting the inputs")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_upgrade)
