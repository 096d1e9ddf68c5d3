"""Recipes: several surgery steps on one net (and its weights), from a TOML file.

```toml
net = "train_val.prototxt"        # paths are relative to the recipe's folder
weights = "bvlc_googlenet.caffemodel"
output = "finetune.prototxt"
out_weights = "finetune.caffemodel"
seed = 1

[[step]]
op = "rename-heads"
num_output = 7
lr_mult = [10, 20]

[[step]]
op = "freeze"
until = "inception_4e/output"
```

Each ``[[step]]`` names a verb (``op``) and takes that verb's options, spelled as on the
command line or as the Python argument (``num-output`` or ``num_output``).
"""

from __future__ import annotations

import inspect
import keyword
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LayerNotFoundError, SurgeryError
from ..net import Net
from .report import Report

__all__ = ["OPS", "load_recipe", "apply_recipe", "validate_recipe", "recipe_files",
           "step_reads", "check_outputs"]

# step op -> function name in surgery.ops
OPS: dict[str, str] = {
    "rename-heads": "rename_heads",
    "freeze": "freeze",
    "unfreeze": "unfreeze",
    "lr": "set_lr",
    "deploy": "to_deploy",
    "fc-to-conv": "fc_to_conv",
    "insert-eltwise": "insert_eltwise",
    "insert-gate": "insert_gate",
    "cut": "cut",
    "init": "init_weights",
    "transplant": "transplant",
}
# "solver" and "train" hold surgery.train.stages' [[train]] stages (run by `surgery apply`)
_TOP_KEYS = ("net", "weights", "output", "out_weights", "seed", "step", "solver", "train")
# option spellings of the CLI that differ from the Python argument
_ALIASES: dict[str, tuple[str, ...]] = {
    "layer": ("layers",),
    "except": ("except_",),
    "from": ("from_", "source", "src", "weights"),
    "map": ("mapping", "map_"),
}
# options holding file paths, resolved against the recipe's folder
_PATH_OPTIONS = frozenset({"from_", "source", "src", "weights", "report", "path", "report_path"})
# ... of which these are written by the step, not read
_WRITTEN_OPTIONS = frozenset({"report", "report_path"})
_NOT_OPTIONS = frozenset({"net", "rng"})
# options taking {old: new}; a recipe may also write them as ["OLD=NEW", ...]
_MAPPINGS = frozenset({"map", "rename", "mapping"})


def load_recipe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a TOML recipe.

    Raises:
        SurgeryError: the file cannot be read or is not valid TOML (with line and column).
    """
    try:
        import tomllib  # type: ignore[import-not-found]
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            raise SurgeryError(
                "reading a TOML recipe needs Python 3.11+ or the tomli package "
                "(pip install tomli); a dict recipe works without it"
            ) from None
    from .._inputs import read_regular

    p = Path(path)
    raw = read_regular(p, "recipe", max_bytes=64 << 20)
    try:
        recipe = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SurgeryError(f"{p}: not a valid TOML recipe: {exc}") from None
    except RecursionError:  # tomllib recurses once per nested array / inline table
        raise SurgeryError(f"{p}: arrays or tables nested too deeply (at most "
                           f"{MAX_DEPTH} levels)") from None
    _check_depth(recipe, str(p))
    return recipe  # type: ignore[no-any-return]


#: How deeply a recipe's values may nest (tables and arrays); real recipes use 3.
MAX_DEPTH = 8


def _check_depth(value: Any, where: str) -> None:
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, Mapping):
            children: Any = v.values()
        elif isinstance(v, list):
            children = v
        else:
            continue
        if depth >= MAX_DEPTH:
            raise SurgeryError(f"{where}: arrays or tables nested too deeply (at most "
                               f"{MAX_DEPTH} levels)")
        stack.extend((c, depth + 1) for c in children)


#: The recipe's own file keys: (key, role) -- inputs are read, outputs written.
FILE_KEYS = (("net", "input"), ("weights", "input"), ("output", "output"),
             ("out_weights", "output"))


def _path_value(value: Any, what: str) -> str | None:
    """A path option's value: a non-empty string, or None when unset."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        shown = repr(value)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        raise SurgeryError(f"{what} must be a file path in quotes (a string); got "
                           f"{type(value).__name__} {shown}")
    if "\0" in value:
        raise SurgeryError(f"{what}: a file path cannot hold a NUL character")
    return value


def recipe_files(recipe: Mapping[str, Any], base: str | os.PathLike[str]) -> dict[str, str | None]:
    """The recipe's ``net``, ``weights``, ``output``, ``out_weights`` as absolute paths.

    Relative paths resolve against ``base`` (the recipe's folder).

    Raises:
        SurgeryError: a key holds something else than a path string (``output = 5``).
    """
    out: dict[str, str | None] = {}
    for key, _ in FILE_KEYS:
        value = _path_value(recipe.get(key, recipe.get(key.replace("_", "-"))),
                            f"recipe: {key}")
        out[key] = None if value is None else os.path.abspath(os.path.join(base, value))
    return out


def step_reads(recipe: Mapping[str, Any], base: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """The files the steps read (``transplant.from`` ...): ``[(what, absolute path)]``.

    Raises:
        SurgeryError: as :func:`validate_recipe`, or a path option that is not a string.
    """
    reads = []
    steps = recipe.get("step", recipe.get("steps", []))
    for i, ((op, fn, _), raw) in enumerate(zip(validate_recipe(recipe), steps, strict=True), 1):
        params = _signature(fn)
        for key, value in raw.items():
            name = _option_name(key, params)
            if name in _PATH_OPTIONS and name not in _WRITTEN_OPTIONS:
                what = f"step {i} ({op}) {key}"
                path = _path_value(value, what)
                if path is not None:
                    reads.append((what, os.path.abspath(os.path.join(base, path))))
    return reads


def check_outputs(
    outputs: Mapping[str, str | None],
    reads: Sequence[tuple[str, str | None]],
    *,
    recipe_path: str | os.PathLike[str] | None = None,
    base: str | os.PathLike[str] | None = None,
    from_recipe: Sequence[str] = (),
    in_place: bool = False,
    force: bool = False,
) -> None:
    """Refuse outputs that would destroy a file (rules 7-8 of :func:`apply_recipe`).

    Args:
        outputs: ``{key: path}`` of the files to write (None: not written).
        reads: ``[(what, path)]`` of every file read: the net, weights, step sources.
        recipe_path: the recipe file itself (never overwritten).
        base: the recipe's folder.
        from_recipe: the output keys whose paths come from the recipe (not the caller).
        in_place: allow overwriting a file that is read.
        force: allow replacing an existing file outside the recipe's folder.

    Raises:
        SurgeryError: naming the output, the file it would destroy and the option that
            allows it.
    """
    real = {k: os.path.realpath(v) for k, v in outputs.items() if v is not None}
    seen: dict[str, str] = {}
    for key, path in real.items():
        if path in seen:
            raise SurgeryError(f"recipe: {seen[path]} and {key} name the same file "
                               f"({outputs[key]}); give two different paths")
        seen[path] = key
        if recipe_path is not None and path == os.path.realpath(recipe_path):
            raise SurgeryError(f"recipe: {key} {outputs[key]} is the recipe itself; choose "
                               "another path")
        for what, src in reads:
            if src is not None and path == os.path.realpath(src) and not in_place:
                raise SurgeryError(
                    f"recipe: {key} {outputs[key]} would overwrite {what} {src}, which the "
                    "recipe reads; choose another path or pass --in-place"
                )
        if key in from_recipe and base is not None and os.path.lexists(path) and not (
            force or in_place
        ):
            folder = os.path.realpath(base)
            if os.path.commonpath([folder, path]) != folder:
                raise SurgeryError(
                    f"recipe: {key} {outputs[key]} is an existing file outside the recipe's "
                    f"folder {folder}; pass --force to replace it, or give -o/--out-weights"
                )


def _op_function(op: str) -> Callable[..., Any]:
    from .. import ops

    try:
        return getattr(ops, OPS[op])
    except (ModuleNotFoundError, AttributeError):
        raise SurgeryError(f"op {op!r} is not available in this installation") from None


def _signature(fn: Callable[..., Any]) -> dict[str, inspect.Parameter]:
    return {
        k: v
        for k, v in inspect.signature(fn).parameters.items()
        if k not in _NOT_OPTIONS and v.kind not in (v.VAR_POSITIONAL, v.VAR_KEYWORD)
    }


def _option_name(key: str, params: Mapping[str, Any]) -> str | None:
    k = key.replace("-", "_")
    candidates = [k, k + "_", *_ALIASES.get(key, ()), *_ALIASES.get(k, ())]
    if keyword.iskeyword(k):
        candidates.insert(0, k + "_")
    return next((c for c in candidates if c in params), None)


def _cli_spelling(name: str) -> str:
    return name.rstrip("_").replace("_", "-")


Step = tuple[str, Callable[..., Any], dict[str, Any]]


def validate_recipe(recipe: Mapping[str, Any]) -> list[Step]:
    """Check a recipe's structure, ops and options before anything runs.

    Returns:
        ``[(op, function, {argument: value})]`` for each step.

    Raises:
        SurgeryError: an unknown top-level key, op or option (naming the step index and the
            valid names), or a step without ``op``.
    """
    unknown = [k for k in recipe if k.replace("-", "_") not in _TOP_KEYS and k != "steps"]
    if unknown:
        raise SurgeryError(
            f"recipe: unknown key(s) {', '.join(map(repr, unknown))}; valid keys: "
            + ", ".join(_TOP_KEYS)
        )
    seed = recipe.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                             or not 0 <= seed < 2**64):
        raise SurgeryError(f"recipe: seed must be an integer in [0, 2^64); found {seed!r:.60}")
    steps = recipe.get("step", recipe.get("steps", []))
    if isinstance(steps, Mapping):
        raise SurgeryError("recipe: step is one table; write each step as [[step]] (double "
                           "brackets), one per step")
    if not isinstance(steps, list) or not steps:
        raise SurgeryError('recipe: no steps; add [[step]] tables with op = "..."')
    plan = []
    for i, step in enumerate(steps, 1):
        if not isinstance(step, Mapping) or "op" not in step:
            raise SurgeryError(f"step {i}: needs op = one of {', '.join(OPS)}")
        op = str(step["op"])
        if op.replace("_", "-") in OPS:
            op = op.replace("_", "-")
        if op not in OPS:
            from ..errors import did_you_mean

            raise SurgeryError(
                f"step {i}: unknown op {op!r}{did_you_mean(op, OPS)}; valid ops: " + ", ".join(OPS)
            )
        try:
            fn = _op_function(op)
        except SurgeryError as exc:
            raise SurgeryError(f"step {i}: {exc}") from None
        params = _signature(fn)
        args: dict[str, Any] = {}
        for key, value in step.items():
            if key == "op":
                continue
            name = _option_name(key, params)
            if name is None:
                raise SurgeryError(
                    f"step {i} ({op}): unknown option {key!r}; valid options: "
                    + ", ".join(_cli_spelling(p) for p in params)
                )
            args[name] = value
        plan.append((op, fn, args))
    return plan


def _value(base: Path, key: str, value: Any) -> Any:
    """A step option's value as the op wants it: paths resolved, ``["A=B"]`` lists as dicts."""
    if key in _PATH_OPTIONS:
        return _resolve(base, value)
    if (
        key in _MAPPINGS
        and isinstance(value, list)
        and all(isinstance(v, str) and "=" in v for v in value)
    ):
        return dict(v.split("=", 1) for v in value)
    return value


def _resolve(base: Path, value: Any) -> Any:
    if isinstance(value, str) and value and not os.path.isabs(value):
        return str(base / value)
    return value


def apply_recipe(
    recipe: Mapping[str, Any] | str | os.PathLike[str],
    net: Net | None = None,
    *,
    base_dir: str | os.PathLike[str] | None = None,
    write: bool = True,
    output: str | os.PathLike[str] | None = None,
    out_weights: str | os.PathLike[str] | None = None,
    seed: int | None = None,
    in_place: bool = False,
    force: bool = False,
) -> tuple[Net, Report]:
    """Run a recipe's steps in order on one net, then write the result.

    Rules:

    1. ``recipe`` is a dict or the path of a TOML file; relative paths in it (``net``,
       ``weights``, ``output``, ``out_weights``, and step options naming files) resolve
       against the recipe's folder (``base_dir`` for a dict; default the current folder).
       The resolved paths are in the report (``report.data["files"]``).
    2. Every step is validated before anything runs: an unknown op or option, a path that is
       not a string (``output = 5``, ``net = [...]``) or values nested too deeply are errors
       naming the step or key.
    3. ``net`` (when given) replaces the recipe's ``net``/``weights``.
    4. One random generator, seeded with ``seed`` (argument, else the recipe's, else
       :data:`surgery.fillers.DEFAULT_SEED`), serves every step, so a recipe is reproducible;
       a step's own ``seed`` option wins for that step.
    5. A step that fails stops the recipe with an error naming the step; nothing is written.
    6. Only after every step succeeded, the result is written (``output``/``out_weights``,
       arguments over the recipe's keys) unless ``write`` is false, both files as one set
       (:mod:`surgery._atomic`).
    7. An output is never the recipe itself, and never a file the recipe reads (its net or
       weights, a step's ``from``) unless ``in_place``.
    8. An output path taken from the recipe never replaces an existing file outside the
       recipe's folder unless ``force`` (or ``in_place``): a recipe from elsewhere cannot
       overwrite your files. Paths given as arguments are the caller's choice.

    Args:
        recipe: the recipe dict, or a path to a ``.toml`` file.
        net: a net to start from instead of the recipe's ``net``.
        base_dir: the folder relative paths resolve against (dict recipes).
        write: write the outputs named by the recipe or the arguments.
        output: where to write the definition (overrides the recipe's ``output``).
        out_weights: where to write the weights (overrides ``out_weights``).
        seed: the seed (overrides the recipe's ``seed``).
        in_place: allow an output to replace a file the recipe reads (rule 7).
        force: allow a recipe's output to replace a file outside its folder (rule 8).

    Returns:
        ``(final net, report)``; ``report.data["steps"]`` holds each step's report.

    Raises:
        SurgeryError: a bad recipe, a refused output, a failing step (its message prefixed
            with the step), or no net to start from.
    """
    from ..caffe_io import load, save
    from ..fillers import DEFAULT_SEED

    recipe_path: str | None = None
    if not isinstance(recipe, Mapping):
        recipe_path = os.path.abspath(os.fspath(recipe))
        base = Path(recipe_path).parent
        recipe = load_recipe(recipe_path)
    else:
        base = Path(base_dir).resolve() if base_dir is not None else Path.cwd()
        _check_depth(recipe, "recipe")
    plan = validate_recipe(recipe)  # rule 2
    files = recipe_files(recipe, base)
    reads = step_reads(recipe, base)
    if seed is None:
        seed = recipe.get("seed", DEFAULT_SEED)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise SurgeryError(f"recipe: seed must be an integer; got {seed!r}")
    rng = np.random.default_rng(seed)

    given = {"output": output, "out_weights": out_weights}
    outputs = {k: os.path.abspath(os.fspath(v)) if v is not None else files[k]
               for k, v in given.items()}
    if write:
        if net is None:
            inputs = [("the net", files["net"]), ("the weights", files["weights"])]
        else:
            inputs = [("the net", net.source), ("the weights", net.weights_source)]
        check_outputs(outputs, [*inputs, *reads], recipe_path=recipe_path, base=base,
                      from_recipe=[k for k, v in given.items() if v is None],
                      in_place=in_place, force=force)  # rules 7-8
        for key, dst in outputs.items():
            if dst is not None and not Path(dst).parent.is_dir():
                raise SurgeryError(f"recipe: cannot write {key} {dst}: its folder does not "
                                   "exist")

    if net is None:  # rule 3
        if files["net"] is None:
            raise SurgeryError('recipe: no net = "NET.prototxt" (and no net given)')
        net = load(files["net"], files["weights"])
    report = Report("apply")
    report.seed = seed
    report.data["files"] = {
        "recipe": recipe_path,
        "net": net.source or files["net"],
        "weights": net.weights_source if net.weights_source else files["weights"],
        "reads": [p for _, p in reads],
        **outputs,
    }
    current = net
    for i, (op, fn, args) in enumerate(plan, 1):  # rules 4-5
        call = {k: _value(base, k, v) for k, v in args.items()}
        params = _signature(fn)
        if "rng" in inspect.signature(fn).parameters and "seed" not in call:
            call["rng"] = rng
            if "seed" in params:
                call["seed"] = seed
        try:
            current, step_report = fn(current, **call)
        except LayerNotFoundError as exc:
            raise LayerNotFoundError(f"step {i} ({op}): {exc}") from None
        except SurgeryError as exc:
            raise _prefixed(exc, f"step {i} ({op}): ") from None
        except (TypeError, ValueError, AttributeError, RecursionError) as exc:
            # a value of the wrong kind reaching the op (a list where a number is needed)
            raise SurgeryError(f"step {i} ({op}): bad option value: "
                               f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                               ) from None
        report.merge(step_report)
        report.change(None, f"step {i}: {op} ({len(step_report.changed)} change(s))")
    output, out_weights = outputs["output"], outputs["out_weights"]
    if write and out_weights is not None and not current.has_weights:
        raise SurgeryError(
            "recipe: out_weights is set but the net has no weights; add "
            'weights = "...caffemodel" to the recipe'
        )
    report.data["output"] = output
    report.data["out_weights"] = out_weights
    if write and (output is not None or out_weights is not None):  # rule 6
        save(current, output, out_weights)
        report.note("wrote " + " and ".join(str(p) for p in (output, out_weights) if p))
    return current, report


def _prefixed(exc: SurgeryError, prefix: str) -> SurgeryError:
    try:
        new = type(exc)(prefix + str(exc))
    except TypeError:  # an error class with another constructor
        new = SurgeryError(prefix + str(exc))
    return new
