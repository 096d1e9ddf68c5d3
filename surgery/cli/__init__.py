"""The ``surgery`` command line: thin verbs over the library.

Each verb: load -> op -> check -> save atomically -> print the report. A
:class:`~surgery.errors.SurgeryError` prints one line on stderr and exits 2 (``--debug`` shows
the traceback). Torch and onnx are imported only by the verbs that need them.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from ..errors import SurgeryError
from ..errors import printable as escape

__all__ = [
    "main",
    "parse_input_shapes",
    "input_shapes",
    "add_input_shape_option",
    "info_report",
    "build_parser",
    "CliError",
    "ensure_output",
    "ensure_distinct",
    "load_for_edit",
    "refuse_new_problems",
    "add_fill_missing",
    "weights_coverage",
    "emit",
    "missing_extra_message",
    "OPTIONAL_MODULES",
    "escape",
    "one_line",
]


class CliError(SurgeryError):
    """Bad command-line usage (exit code 2)."""


def ensure_output(
    inputs: Sequence[str | os.PathLike[str] | None],
    output: str | None,
    in_place: bool = False,
    what: str = "-o",
) -> None:
    """Refuse to overwrite an input unless ``--in-place`` was given.

    Raises:
        CliError: the output names one of the inputs.
    """
    if output is None:
        return
    out = Path(output).resolve()
    for src in inputs:
        if src is not None and Path(src).resolve() == out and not in_place:
            raise CliError(
                f"{what} {output} would overwrite the input {src}; choose another path or pass "
                "--in-place"
            )
    parent = out.parent
    if not parent.is_dir():
        raise CliError(f"{what} {output}: folder {parent} does not exist")


def ensure_distinct(first: str | None, second: str | None, what: str) -> None:
    """Refuse two outputs that name the same file (one would overwrite the other).

    Raises:
        CliError: both are given and resolve to the same path.
    """
    if first is not None and second is not None and Path(first).resolve() == Path(
        second
    ).resolve():
        raise CliError(f"{what} name the same file ({first}); give two different paths")


def load_for_edit(args: argparse.Namespace, *, weights_need_output: bool = False) -> Any:
    """Check ``-o``/``--out-weights`` against the inputs, then load the net (and weights).

    Args:
        args: parsed options with ``net``, ``output``, ``in_place`` and optionally ``weights``
            and ``out_weights``.
        weights_need_output: refuse ``--weights`` without ``--out-weights`` (verbs whose only
            use of the weights is to write them anew).

    Raises:
        CliError: an output names an input, the two outputs are one file, or the weight
            options do not pair up.
    """
    from ..caffe_io import load

    weights = getattr(args, "weights", None)
    out_weights = getattr(args, "out_weights", None)
    ensure_output([args.net, weights], args.output, args.in_place)
    if out_weights is not None:
        ensure_output([args.net, weights], out_weights, args.in_place, "--out-weights")
        if weights is None:
            raise CliError("--out-weights needs --weights (the caffemodel to start from)")
        ensure_distinct(args.output, out_weights, "-o and --out-weights")
    elif weights is not None and weights_need_output:
        raise CliError("--weights needs --out-weights (where to write the new caffemodel)")
    net = load(args.net, weights)
    args._input_net = net  # for refuse_new_problems: what the verb started from
    return net


def refuse_new_problems(args: argparse.Namespace, net: Any) -> None:
    """Never write a net that ``surgery info`` refuses when the input passed it.

    The ops end with :func:`surgery.check.check`, which infers only what a definition states;
    this also runs the inference ``info`` runs (:func:`surgery.check.inference_problems`) and
    refuses a result that fails in a phase where the input (``load_for_edit``'s net) did not.

    Raises:
        NetError: the result would fail ``info`` (nothing is written).
    """
    from ..check import inference_problems
    from ..errors import NetError

    after = inference_problems(net)
    if not after:
        return
    before_net = getattr(args, "_input_net", None)
    before = inference_problems(before_net) if before_net is not None else {}
    new = {p: m for p, m in after.items() if p not in before}
    if new:
        phase, msg = next(iter(new.items()))
        raise NetError(f"the result would fail `surgery info` in the {phase} net ({msg}); "
                       "nothing written")


def parse_input_shapes(items: Sequence[str] | None) -> dict[str, tuple[int, ...]]:
    """Parse ``--input-shape`` values: ``BLOB=N,C,H,W`` (or ``NxCxHxW``); a bare ``N,C,H,W``
    is stored under ``""`` (the net's only input, see :func:`input_shapes`).

    Raises:
        CliError: a malformed value.
    """
    out: dict[str, tuple[int, ...]] = {}
    for item in items or ():
        name, _, dims = item.rpartition("=")
        try:
            shape = tuple(int(d) for d in dims.replace("x", ",").split(",") if d.strip())
        except ValueError:
            shape = ()
        if not shape or any(d <= 0 for d in shape):
            raise CliError(f"--input-shape {item!r}: expected BLOB=N,C,H,W with positive "
                           "integers")
        out[name.strip()] = shape
    return out


def input_shapes(
    net: Any, items: Sequence[str] | None, phase: str | None = None
) -> dict[str, tuple[int, ...]] | None:
    """The ``--input-shape`` options of a verb, bound to the net's inputs.

    Names must be tops of ``Input`` or dataset layers (a label too); a bare ``N,C,H,W`` goes
    to the only image input (the ``Input`` tops and the first top of each dataset layer).
    Everything not given is inferred as ``surgery info`` infers it
    (:func:`surgery.shapes.starting_shapes`).

    Args:
        net: the loaded net.
        items: the option values.
        phase: "TRAIN"/"TEST", or None for both (verbs that edit a train_val net).

    Returns:
        ``{top: shape}``, or None when no option was given.

    Raises:
        CliError: a malformed value, an unknown name, or a bare shape for a net with several
            inputs.
    """
    shapes = parse_input_shapes(items)
    if not shapes:
        return None
    from ..dataflow import resolve
    from ..layers import is_data
    from ..net import NetState

    tops: list[str] = []
    firsts: list[str] = []
    for ph in [phase.upper()] if phase else ["TEST", "TRAIN"]:
        try:
            flow = resolve(net, NetState(ph))
        except SurgeryError:
            if phase:
                raise
            continue
        for node in flow.nodes:
            lay = node.layer
            if lay.type == "Input" or (is_data(lay) and not node.inputs):
                tops += lay.tops
                firsts += lay.tops if lay.type == "Input" else lay.tops[:1]
    tops, firsts = list(dict.fromkeys(tops)), list(dict.fromkeys(firsts))
    if "" in shapes:
        if len(firsts) != 1:
            raise CliError(f"--input-shape without a name needs a net with one input; this "
                           f"one has {firsts}: write BLOB=N,C,H,W")
        shapes = {**{k: v for k, v in shapes.items() if k}, firsts[0]: shapes[""]}
    unknown = [k for k in shapes if k not in tops]
    if unknown:
        raise CliError(f"--input-shape names {unknown}, which are not inputs of the net "
                       f"(inputs: {tops})")
    return shapes


def add_input_shape_option(p: argparse.ArgumentParser) -> None:
    """``--input-shape BLOB=N,C,H,W`` (repeatable), the same for every verb."""
    p.add_argument(
        "--input-shape", action="append", default=[], metavar="BLOB=N,C,H,W",
        help="shape of an input or data top (repeatable; a bare N,C,H,W for the only input); "
        "default: what `surgery info` infers (data layers: batch_size, crop_size, channels "
        "from the weights or the mean values, else 3)",
    )


def add_fill_missing(p: argparse.ArgumentParser, *, seed: bool) -> None:
    """``--fill-missing`` (and ``--seed`` when the verb has none) for a verb taking
    ``--weights``."""
    p.add_argument("--fill-missing", action="store_true",
                   help="draw the layers IN.caffemodel has no weights for from their fillers "
                   "(as `surgery init`) into OUT.caffemodel")
    if seed:
        p.add_argument("--seed", type=int, default=None,
                       help="seed for --fill-missing (default: surgery.fillers.DEFAULT_SEED)")


def weights_coverage(args: argparse.Namespace, net: Any, report: Any) -> Any:
    """After an op with ``--weights``: report the learnable layers that have no weights, or
    draw them with ``--fill-missing`` (:func:`surgery.ops.init.init_weights`).

    Returns:
        The net to save (a new one when layers were drawn).

    Raises:
        CliError: ``--fill-missing`` without ``--weights``.
    """
    weights = getattr(args, "weights", None)
    fill = getattr(args, "fill_missing", False)
    if weights is None:
        if fill:
            raise CliError("--fill-missing needs --weights (the caffemodel whose gaps to fill)")
        return net
    from ..ops.init import init_weights, missing_weights

    missing = missing_weights(net)
    if not missing:
        return net
    shown = ", ".join(missing[:8]) + (f" ... ({len(missing)} in all)" if len(missing) > 8 else "")
    if fill:
        shapes = input_shapes(net, getattr(args, "input_shape", None))
        net, drawn = init_weights(net, seed=getattr(args, "seed", None), input_shapes=shapes)
        report.left[:] = [e for e in report.left if e.get("layer") not in missing]
        for c in drawn.changed:
            report.change(c["layer"], "--fill-missing: " + c["what"])
        report.seed = drawn.seed if report.seed is None else report.seed
        report.note(f"--fill-missing: {len(missing)} layer(s) without weights in {weights} "
                    f"drawn from their fillers (seed {drawn.seed}): {shown}")
    else:
        listed = {e.get("layer") for e in report.left}
        for name in missing:
            if name in listed:
                continue
            report.leave(name, f"no weights in {weights}: not written either; Caffe draws it "
                         "from its fillers when it loads the net (--fill-missing writes values)")
        report.note(f"{len(missing)} learnable layer(s) have no weights in {weights}: {shown}; "
                    "give --fill-missing to draw them from their fillers")
    report.data["missing_weights"] = missing
    report.data["filled_missing"] = bool(fill)
    return net


def emit(report: dict[str, Any], text: str, as_json: bool) -> None:
    """Print a report as JSON or as text."""
    if as_json:
        print(json.dumps(report, indent=1, default=_json_default))
    else:
        print(text)


def _json_default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


# -- parser -----------------------------------------------------------------------------------
Handler = Callable[[argparse.Namespace], int]

# One module per family of verbs, registered in this order (a missing one is skipped).
VERB_MODULES = (
    "inspect", "edit", "graph", "export", "views", "data", "train", "pipelines",
)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line on stderr (exit 2), like ours."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def one_line(text: str) -> str:
    """``text`` on one line, with control characters (terminal escapes, NUL) escaped.

    Newlines become ``" | "``; any other character below 0x20, DEL and the C1 controls are
    written as ``\\xNN`` so a hostile layer or file name cannot drive the terminal.
    """
    text = " | ".join(part for part in text.split("\n") if part.strip())
    return escape(text)


#: Option destinations that name input files; an error that names none of them gets the net
#: (and weights) as prefix, so every message says which file it is about.
_FILE_DESTS = ("recipe", "net", "weights", "input", "golden", "source", "output",
               "out_weights", "report")


def _with_file(args: argparse.Namespace, message: str) -> str:
    # The known file options first, then any other string option naming an existing path
    # (the positional input of verbs added later: solver, mean, TORCH_DIR...).
    named = [d for d in _FILE_DESTS if isinstance(getattr(args, d, None), (str, list))]
    named += [d for d, v in vars(args).items() if d not in named and isinstance(v, str)
              and d not in ("verb", "target") and v and os.path.lexists(v)]
    files: list[str] = []
    for dest in named:
        value = getattr(args, dest, None)
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, str) and v:
                files.append(v)
    if not files or any(f in message for f in files):
        return message
    outputs = ("output", "out_weights", "report")
    inputs = [(d, getattr(args, d)) for d in named
              if d not in outputs and isinstance(getattr(args, d, None), str)]
    if not inputs:
        return f"{files[0]}: {message}"
    (_, first), rest = inputs[0], inputs[1:]
    extra = ", ".join(f"{dest.replace('_', '-')} {value}" for dest, value in rest)
    return f"{first}" + (f" ({extra})" if extra else "") + f": {message}"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every verb registered."""
    parser = _Parser(
        prog="surgery",
        description="Model surgery on Caffe networks (prototxt + caffemodel).",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    sub.required = True

    for module in VERB_MODULES:
        try:
            mod = __import__(f"{__package__}.{module}", fromlist=["register"])
        except ModuleNotFoundError as exc:
            if exc.name != f"{__package__}.{module}":
                raise
            continue
        mod.register(sub)
    for verb_parser in _leaf_parsers(sub):
        verb_parser.add_argument(
            "--max-bytes", type=_size, default=None, metavar="N",
            help="refuse to allocate more than N bytes for one array (suffixes K, M, G; "
            "default a quarter of RAM)")
    return parser


#: Optional modules a verb may need -> the extra of caffe-surgery that installs them.
OPTIONAL_MODULES = {
    "onnx": "onnx",
    "onnxruntime": "onnx",
    "torch": "torch",
    "safetensors": "torch",
    "cv2": "all",
}


def missing_extra_message(exc: ModuleNotFoundError) -> str | None:
    """One line naming the extra to install for a missing optional module, or None.

    Args:
        exc: the import error raised by a verb.

    Returns:
        ``"... pip install 'caffe-surgery[onnx]'"`` when the missing module is one of
        :data:`OPTIONAL_MODULES` (or a submodule of one), else None.
    """
    root = (exc.name or "").partition(".")[0]
    extra = OPTIONAL_MODULES.get(root)
    if extra is None:
        return None
    what = {"cv2": "OpenCV (cv2)"}.get(root, root)
    return (f"this command needs {what}, which is not installed: "
            f"pip install 'caffe-surgery[{extra}]'")


def _quiet_broken_pipe() -> int:
    """stdout was closed by the reader (``surgery info NET | head``): exit quietly.

    Python flushes stdout again at exit, which would raise once more; point the descriptor
    at /dev/null so that final flush succeeds silently.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # pragma: no cover - stdout without a descriptor
        pass
    return 0


def _leaf_parsers(sub: Any) -> list[argparse.ArgumentParser]:
    out = []
    for p in dict.fromkeys(sub.choices.values()):  # aliases map to one parser
        nested = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        out.extend(_leaf_parsers(nested[0]) if nested else [p])
    return out


def _size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1:] if t[-1:] in units and t[-1:] else ""
    try:
        value = int(float(t[: len(t) - len(unit)]) * units[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def _check_common(args: argparse.Namespace) -> None:
    """Options every verb may have, checked once here rather than in each verb."""
    seed = getattr(args, "seed", None)
    if seed is not None and not (isinstance(seed, int) and 0 <= seed < 2**64):
        raise CliError(f"--seed must be an integer in [0, 2^64); got {seed}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 verification failed, 2 bad input)."""
    from .._atomic import Terminated, sigterm_as_exit
    from .._inputs import set_max_bytes

    parser = build_parser()
    args = parser.parse_args(argv)
    old_limit = set_max_bytes(getattr(args, "max_bytes", None))
    # Python's default GC thresholds (700, 10, 10) make building the dataflow of a 100k-layer
    # net quadratic-looking (every young collection walks the growing graph); a larger first
    # threshold keeps it linear (tools/bench_scale.py) and costs nothing on small nets.
    old_gc = gc.get_threshold()
    gc.set_threshold(max(old_gc[0], 50_000), max(old_gc[1], 20), max(old_gc[2], 100))
    try:
        _check_common(args)
        with sigterm_as_exit():  # SIGTERM cleans up like Ctrl-C (outputs are written as a set)
            code = int(args.func(args) or 0)
        sys.stdout.flush()
        return code
    except SurgeryError as exc:
        if args.debug:
            traceback.print_exc()
        message = one_line(_with_file(args, str(exc)))
        print(f"surgery {args.verb}: error: {message}", file=sys.stderr)
        return 2
    except RecursionError:
        if args.debug:
            traceback.print_exc()
        print(f"surgery {args.verb}: error: {one_line(_with_file(args, 'nested too deeply'))}"
              f" (a definition, recipe or weights file nests messages beyond what this tool "
              f"and Caffe accept)", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        message = missing_extra_message(exc)
        if message is None:
            raise
        if args.debug:
            traceback.print_exc()
        print(f"surgery {args.verb}: error: {message}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated", file=sys.stderr)
        return 143
    finally:
        set_max_bytes(old_limit)
        gc.set_threshold(*old_gc)


def __getattr__(name: str) -> Any:  # surgery.cli.info_report etc. live in cli.inspect
    if name in ("info_report", "info_text"):
        from . import inspect

        return getattr(inspect, name)
    raise AttributeError(name)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
