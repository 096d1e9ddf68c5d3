"""CLI verbs for the fine-tuning ops: rename-heads, freeze, unfreeze, lr, deploy, fc-to-conv,
apply. Each is a thin wrapper: load -> op (which checks) -> save atomically -> print the report.

Only light modules are imported here (no torch, no onnx).
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

from . import (
    CliError,
    add_fill_missing,
    add_input_shape_option,
    emit,
    ensure_output,
    input_shapes,
    load_for_edit,
    refuse_new_problems,
    weights_coverage,
)

__all__ = ["register"]


# -- argument parsing helpers (errors are CliError -> exit 2, one line) ----------------------
def _floats(text: str | None, what: str, count: tuple[int, int] = (1, 2)) -> list[float] | None:
    if text is None:
        return None
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CliError(f"{what} must be W or W,B (numbers); got {text!r}") from None
    if not count[0] <= len(vals) <= count[1]:
        raise CliError(f"{what} must be W or W,B (numbers); got {text!r}")
    if not all(math.isfinite(v) for v in vals):
        raise CliError(f"{what} must be finite numbers; got {text!r}")
    return vals


def _positive_int(text: str, what: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise CliError(f"{what} must be a positive integer; got {text!r}") from None
    if v <= 0:
        raise CliError(f"{what} must be a positive integer; got {text!r}")
    return v


def _shape(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        dims = [int(d) for d in text.replace("x", ",").split(",") if d.strip()]
    except ValueError:
        raise CliError(f"--input-shape must be N,C,H,W; got {text!r}") from None
    if not dims or any(d <= 0 for d in dims):
        raise CliError(f"--input-shape must be N,C,H,W (positive); got {text!r}")
    return dims


def _split_globs(values: list[str] | None) -> list[str] | None:
    if values is None:
        return None
    return [p for v in values for p in v.split(",") if p]


def _common(p: argparse.ArgumentParser, weights: bool, seed: bool = False) -> None:
    p.add_argument("net", help="NET.prototxt")
    p.add_argument("-o", "--output", required=True, help="OUT.prototxt")
    if weights:
        p.add_argument("--weights", help="IN.caffemodel")
        p.add_argument("--out-weights", help="OUT.caffemodel (needs --weights)")
        add_fill_missing(p, seed=not seed)
    if seed:
        p.add_argument(
            "--seed",
            type=int,
            default=None,
            help="seed for new random weights (default: surgery.fillers.DEFAULT_SEED)",
        )
    p.add_argument("--in-place", action="store_true", help="allow overwriting an input")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def _finish(args: argparse.Namespace, net: Any, report: Any) -> int:
    from ..caffe_io import save

    out_weights = getattr(args, "out_weights", None)
    weights = getattr(args, "weights", None)
    if weights is not None and out_weights is None and getattr(args, "_changes_blobs", False):
        report.note("--weights given without --out-weights: the new weights were not written")
    if out_weights is not None or getattr(args, "fill_missing", False):
        net = weights_coverage(args, net, report)
    refuse_new_problems(args, net)
    save(net, args.output, out_weights)
    data = report.as_dict()
    data["output"] = args.output
    data["out_weights"] = out_weights
    text = report.text() + f"\nwrote {args.output}" + (f" and {out_weights}" if out_weights else "")
    emit(data, text, args.json)
    return 0


# -- verbs ------------------------------------------------------------------------------------
def cmd_rename_heads(args: argparse.Namespace) -> int:
    from ..ops.heads import rename_heads

    num_output = _positive_int(args.num_output, "--num-output")
    lr = _floats(args.lr_mult, "--lr-mult")
    rename: dict[str, str] = {}
    for item in args.rename or []:
        old, sep, new = item.partition("=")
        if not sep or not old or not new:
            raise CliError(f"--rename takes OLD=NEW; got {item!r}")
        rename[old] = new
    if rename and args.suffix is not None:
        raise CliError("give --suffix or --rename, not both")
    if args.weights and not args.out_weights:
        raise CliError("--weights needs --out-weights (where to write the new caffemodel)")
    net = load_for_edit(args)
    new, report = rename_heads(
        net,
        num_output,
        layers=_split_globs(args.layer),
        suffix=args.suffix or "_ft",
        rename=rename or None,
        rename_tops=args.rename_tops,
        lr_mult=lr,
        seed=args.seed,
        input_shapes=input_shapes(net, args.input_shape),
    )
    return _finish(args, new, report)


def _freeze_like(args: argparse.Namespace, which: str) -> int:
    from ..ops import lr as lr_ops

    if args.until is None and args.layers is None:
        raise CliError(f"{which}: give --until LAYER or --layers GLOB ...")
    net = load_for_edit(args)
    fn = lr_ops.freeze if which == "freeze" else lr_ops.unfreeze
    new, report = fn(
        net, until=args.until, layers=_split_globs(args.layers), except_=_split_globs(args.except_),
        bn_stats=args.bn_stats,
    )
    return _finish(args, new, report)


def cmd_freeze(args: argparse.Namespace) -> int:
    return _freeze_like(args, "freeze")


def cmd_unfreeze(args: argparse.Namespace) -> int:
    return _freeze_like(args, "unfreeze")


def cmd_lr(args: argparse.Namespace) -> int:
    from ..ops.lr import set_lr

    lr = _floats(args.lr_mult, "--lr-mult")
    decay = _floats(args.decay_mult, "--decay-mult")
    if lr is None and decay is None:
        raise CliError("lr: give --lr-mult W[,B] and/or --decay-mult W[,B]")
    net = load_for_edit(args)
    new, report = set_lr(
        net,
        _split_globs(args.layers) or [],
        lr_mult=lr,
        decay_mult=decay,
        except_=_split_globs(args.except_),
    )
    return _finish(args, new, report)


def cmd_deploy(args: argparse.Namespace) -> int:
    from ..ops.deploy import to_deploy

    shape = _shape(args.input_shape)
    net = load_for_edit(args)
    new, report = to_deploy(net, input_shape=shape, keep_aux=args.keep_aux)
    return _finish(args, new, report)


def cmd_fc_to_conv(args: argparse.Namespace) -> int:
    from ..ops.deploy import fc_to_conv

    if args.weights and not args.out_weights:
        raise CliError("--weights needs --out-weights (where to write the reshaped weights)")
    net = load_for_edit(args)
    new, report = fc_to_conv(net, layers=_split_globs(args.layers), suffix=args.suffix,
                             input_shapes=input_shapes(net, args.input_shape))
    return _finish(args, new, report)


def cmd_init(args: argparse.Namespace) -> int:
    from ..caffe_io import load, save
    from ..ops.init import init_weights

    if not str(args.output).endswith(".caffemodel"):
        raise CliError(f"init: -o names the caffemodel to write (W.caffemodel); got {args.output}")
    ensure_output([args.net], args.output, args.in_place)
    net = load(args.net)
    new, report = init_weights(net, seed=args.seed, all_layers=True,
                               input_shapes=input_shapes(net, args.input_shape))
    save(new, weights=args.output)
    data = report.as_dict()
    data["output"] = args.output
    n = len(report.data["filled"])
    emit(data, report.text() + f"\n{n} layer(s) drawn, seed {report.seed}\nwrote {args.output}",
         args.json)
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from ..caffe_io import load, save
    from ..ops.recipe import apply_recipe, check_outputs, load_recipe, recipe_files, step_reads

    recipe = load_recipe(args.recipe)
    base = Path(args.recipe).resolve().parent
    if recipe.get("train"):  # [[train]] stages checked before anything runs or is written
        from ..train.stages import validate_stages

        validate_stages(recipe)
    files = recipe_files(recipe, base)  # the recipe's paths, relative to its folder
    reads = step_reads(recipe, base)

    def given(value: str | None) -> str | None:  # command-line paths: relative to the cwd
        return None if value is None else os.path.abspath(value)

    output = given(args.output) or files["output"]
    out_weights = given(args.out_weights) or files["out_weights"]
    net_path = given(args.net) or files["net"]
    weights = given(args.weights) or files["weights"]
    if args.no_weights:
        if args.weights or args.out_weights:
            raise CliError("apply: --no-weights contradicts --weights/--out-weights")
        weights = out_weights = None
    if output is None and out_weights is None and not args.dry_run:
        raise CliError(
            'apply: nothing to write; set output = "..." in the recipe or give -o (or --dry-run)'
        )
    if net_path is None:
        raise CliError("apply: the recipe names no net; give --net NET.prototxt")
    from_recipe = [k for k, v in (("output", args.output), ("out_weights", args.out_weights))
                   if v is None]
    check_outputs({"output": output, "out_weights": out_weights},
                  [("the net", net_path), ("the weights", weights), *reads],
                  recipe_path=args.recipe, base=base, from_recipe=from_recipe,
                  in_place=args.in_place, force=args.force)
    for dst, what in ((output, "output"), (out_weights, "out_weights")):
        if dst is not None and not Path(dst).parent.is_dir():
            raise CliError(f"apply: {what} {dst}: folder {Path(dst).parent} does not exist")
    net = load(net_path, weights)
    new, report = apply_recipe(recipe, net, base_dir=base, write=False, seed=args.seed)
    if not args.dry_run:
        if out_weights is not None and not new.has_weights:
            raise CliError(
                "apply: out_weights is set but the net has no weights; add "
                'weights = "...caffemodel" to the recipe or give --weights'
            )
        save(new, output, out_weights)
    data = report.as_dict()
    data["output"], data["out_weights"] = output, out_weights
    data["files"] = {"recipe": str(Path(args.recipe).resolve()), "net": net_path,
                     "weights": weights, "reads": [p for _, p in reads],
                     "output": output, "out_weights": out_weights}
    written = [p for p in (output, out_weights) if p]
    text = (report.text() + f"\nread {net_path}" + (f" and {weights}" if weights else "")
            + "".join(f"\nread {p} ({what})" for what, p in reads))
    text += "\ndry run: nothing written" if args.dry_run else "\nwrote " + " and ".join(written)
    if recipe.get("train"):
        from ..train.stages import run_stages

        if args.dry_run or args.no_train:
            text += f"\n{len(recipe['train'])} train stage(s) not run"
        else:
            # the stages' Caffe lines go to stderr under --json, so stdout stays one report
            say = (lambda line: print(line, file=sys.stderr)) if args.json else print
            _, stages = run_stages(recipe, new, base_dir=base, device=args.device, log=say)
            data["train"] = stages
            text += "".join(f"\ntrain stage {s['name']!r}: {s['iterations']} iterations, "
                            f"{s['trainable']} trainable values, snapshot {s['snapshot']}"
                            for s in stages)
    emit(data, text, args.json)
    return 0


# -- registration -----------------------------------------------------------------------------
def register(sub: Any) -> None:
    """Add this module's verbs to the ``surgery`` sub-command parser."""
    p = sub.add_parser("rename-heads", help="rename and resize classifier heads for fine-tuning")
    _common(p, weights=True, seed=True)
    p.add_argument("--num-output", required=True, help="the new number of outputs (classes)")
    p.add_argument(
        "--layer",
        action="append",
        metavar="NAME",
        help="a head to rename (name or glob; repeatable); default: found",
    )
    p.add_argument("--suffix", default=None, help="appended to each head's name (default _ft)")
    p.add_argument("--rename", action="append", metavar="OLD=NEW", help="explicit new names")
    p.add_argument("--rename-tops", action="store_true", help="rename the heads' top blobs too")
    p.add_argument("--lr-mult", metavar="W,B", help="the heads' lr_mult, e.g. 10,20")
    add_input_shape_option(p)
    p.set_defaults(func=cmd_rename_heads, _changes_blobs=True)

    for verb, fn, what in (
        ("freeze", cmd_freeze, "lr_mult 0 / decay_mult 0 on"),
        ("unfreeze", cmd_unfreeze, "lr_mult 1 / decay_mult 1 back on"),
    ):
        p = sub.add_parser(verb, help=f"{what} the learnable blobs of selected layers")
        _common(p, weights=False)
        p.add_argument("--until", metavar="LAYER", help="LAYER and every layer it depends on")
        p.add_argument("--layers", nargs="+", metavar="GLOB", help="layer names or globs")
        p.add_argument(
            "--except", dest="except_", nargs="+", metavar="GLOB", help="layers to leave alone"
        )
        p.add_argument(
            "--bn-stats", action="store_true",
            help=("also write use_global_stats: true on the selected BatchNorm layers (their "
                  "stored statistics, not the batch's, in TRAIN)" if verb == "freeze" else
                  "also remove use_global_stats from the selected BatchNorm layers"),
        )
        p.set_defaults(func=fn)

    p = sub.add_parser("lr", help="set lr_mult / decay_mult on selected layers")
    _common(p, weights=False)
    p.add_argument(
        "--layers", nargs="+", required=True, metavar="GLOB", help="layer names or globs"
    )
    p.add_argument("--lr-mult", metavar="W[,B]", help="lr_mult (weight[,bias])")
    p.add_argument("--decay-mult", metavar="W[,B]", help="decay_mult (weight[,bias])")
    p.add_argument(
        "--except", dest="except_", nargs="+", metavar="GLOB", help="layers to leave alone"
    )
    p.set_defaults(func=cmd_lr)

    p = sub.add_parser("deploy", help="train_val -> deploy definition (Input, Softmax heads)")
    p.add_argument("net", help="TRAIN_VAL.prototxt")
    p.add_argument("-o", "--output", required=True, help="DEPLOY.prototxt")
    p.add_argument("--input-shape", metavar="N,C,H,W", help="the Input layer's shape")
    p.add_argument("--keep-aux", action="store_true",
                   help="keep auxiliary heads (losses with a smaller loss_weight, GoogLeNet's "
                   "loss1/loss2), each with its own Softmax")
    p.add_argument("--weights", help="IN.caffemodel (only to read the input channels)")
    p.add_argument("--in-place", action="store_true", help="allow overwriting an input")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_deploy)

    p = sub.add_parser("fc-to-conv", help="InnerProduct -> equivalent Convolution")
    _common(p, weights=True)
    p.add_argument(
        "--layers",
        nargs="+",
        metavar="NAME",
        help="InnerProduct layers (names or globs, e.g. fc6,fc7,fc8); default all",
    )
    p.add_argument(
        "--suffix",
        default="-conv",
        help="appended to converted layers' names (default -conv; '' keeps the names)",
    )
    add_input_shape_option(p)
    p.set_defaults(func=cmd_fc_to_conv, _changes_blobs=True)

    p = sub.add_parser(
        "init", help="random weights for a net from its fillers (as Caffe initialises it)",
        description="Write a caffemodel with every learnable blob drawn from its filler, as "
        "Caffe does when it builds the net; a weight filler left at constant 0 becomes "
        "gaussian/xavier (reported), BatchNorm gets mean 0, variance 1.")
    p.add_argument("net", help="NET.prototxt")
    p.add_argument("-o", "--output", required=True, help="W.caffemodel")
    p.add_argument("--seed", type=int, default=None,
                   help="seed (default: surgery.fillers.DEFAULT_SEED), reported")
    add_input_shape_option(p)
    p.add_argument("--in-place", action="store_true", help="allow overwriting an input")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("apply", help="run the steps of a TOML recipe on one net")
    p.add_argument("recipe", help="RECIPE.toml")
    p.add_argument("-o", "--output", help="OUT.prototxt (overrides the recipe's output)")
    p.add_argument("--out-weights", help="OUT.caffemodel (overrides the recipe's out_weights)")
    p.add_argument("--net", help="NET.prototxt (overrides the recipe's net)")
    p.add_argument("--weights", help="IN.caffemodel (overrides the recipe's weights)")
    p.add_argument(
        "--no-weights",
        action="store_true",
        help="ignore the recipe's weights and out_weights (definition only)",
    )
    p.add_argument("--seed", type=int, default=None, help="overrides the recipe's seed")
    p.add_argument("--dry-run", action="store_true", help="run the steps, write nothing")
    p.add_argument("--no-train", action="store_true",
                   help="do not run the recipe's [[train]] stages")
    p.add_argument("--device", help="torch device for the [[train]] stages (cpu, cuda:N)")
    p.add_argument("--in-place", action="store_true",
                   help="allow an output to overwrite a file the recipe reads")
    p.add_argument("--force", action="store_true",
                   help="allow the recipe's outputs to replace files outside its folder")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_apply)
