"""CLI verbs that show a surgery for review: diff, draw.

Thin wrappers over :mod:`surgery.diff` and :mod:`surgery.draw`; no torch, no onnx.
"""

from __future__ import annotations

import argparse
from typing import Any

from . import CliError, emit, ensure_output, parse_input_shapes

__all__ = ["register"]


def _load_pair(args: argparse.Namespace) -> tuple[Any, Any]:
    from ..caffe_io import load

    weights = args.weights or [None, None]
    if len(weights) != 2:
        raise CliError("--weights takes two caffemodels: WA WB (one per net)")
    return load(args.a, weights[0]), load(args.b, weights[1])


def cmd_diff(args: argparse.Namespace) -> int:
    from ..diff import diff_nets

    a, b = _load_pair(args)
    result = diff_nets(a, b)
    emit(result.as_dict(), result.text(), args.json)
    return 0 if result.same else 1


def cmd_draw(args: argparse.Namespace) -> int:
    from ..caffe_io import load, write_bytes_atomic, write_text_atomic
    from ..diff import diff_nets
    from ..draw import output_format, render, to_dot

    output = args.output or (str(args.net).rsplit(".", 1)[0] + ".dot")
    ensure_output([args.net, args.weights, args.diff], output, False)
    fmt = output_format(output)
    if fmt != "dot":
        import shutil

        if shutil.which("dot") is None:  # fail before any work, and write nothing
            render("", fmt)
    net = load(args.net, args.weights)
    diff = None
    if args.diff:
        other = load(args.diff)
        diff = diff_nets(other, net)
    dot = to_dot(net, args.phase, diff=diff, input_shapes=parse_input_shapes(args.input_shape),
                 rankdir=args.rankdir)
    if fmt == "dot":
        write_text_atomic(output, dot)
    elif fmt == "svg":
        write_text_atomic(output, render(dot, "svg").decode())
    else:
        write_bytes_atomic(output, render(dot, "png"))
    rep: dict[str, Any] = {"output": output, "format": fmt, "phase": args.phase.upper()}
    text = f"wrote {output}"
    if diff is not None:
        rep["diff"] = diff.as_dict()
        n_ren = sum(1 for c in diff.changed if c.renamed)
        text += (f" ({len(diff.added)} added, {len(diff.removed)} removed, {n_ren} renamed, "
                 f"{sum(1 for c in diff.changed if c.changes)} changed against {args.diff})")
    emit(rep, text, args.json)
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "diff", help="what differs between two nets (exit 1 when they differ, like diff)"
    )
    p.add_argument("a", help="A.prototxt")
    p.add_argument("b", help="B.prototxt")
    p.add_argument("--weights", nargs=2, metavar=("WA", "WB"),
                   help="compare the weights too: one caffemodel per net")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_diff)

    p = sub.add_parser("draw", help="the net as a graph: DOT, or SVG/PNG through Graphviz")
    p.add_argument("net", help="NET.prototxt")
    p.add_argument("-o", "--output", help="net.dot, net.svg or net.png (default: NET.dot)")
    p.add_argument("--diff", metavar="OTHER.prototxt",
                   help="colour the layers added, removed and changed since OTHER")
    p.add_argument("--phase", default="test", choices=["train", "test", "TRAIN", "TEST"])
    p.add_argument("--weights", help="W.caffemodel (parameter counts, channel guesses)")
    p.add_argument("--input-shape", action="append", default=[], metavar="BLOB=N,C,H,W",
                   help="shape of a data/input blob (repeatable)")
    p.add_argument("--rankdir", default="TB", choices=["TB", "LR", "BT", "RL"],
                   help="graph direction (default top to bottom)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_draw)
