"""Caffe's ``solver.prototxt`` -> a plain :class:`SolverConfig`.

Read with our ``SolverParameter`` (:func:`surgery.caffe_io.read_solver`). Every field a Caffe
1.0 solver uses is honoured, or refused in *one* error naming every refused field (with the
fields the schema does not know at all). Net paths (``net``, ``train_net``, ``test_net``) are
resolved as Caffe does -- relative to the working directory -- and then, if not found there,
relative to the solver's folder; :attr:`SolverConfig.notes` says which file was used.

Caffe's rules reproduced (``solver.cpp`` ``InitTrainNet``/``InitTestNets``,
``upgrade_proto.cpp``):

1. Exactly one of ``train_net_param``, ``train_net``, ``net_param``, ``net`` gives the train
   net; its state is the file's ``state``, then ``train_state`` merged in, phase TRAIN.
2. Test nets: each ``test_net_param``, then each ``test_net``, then -- when the train net came
   from ``net``/``net_param`` -- the same net once more for every remaining ``test_iter``
   entry. ``test_iter`` needs one entry per test net; ``test_state`` (if any) one per test net.
3. The legacy ``solver_type`` enum becomes ``type`` (both set is an error).
4. ``snapshot_prefix`` unset: the solver's path without its extension; a folder: the solver's
   file name inside it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SolverError
from ..net import Net, NetState
from .schedule import POLICIES

__all__ = ["SolverConfig", "load_solver", "HONOURED", "REFUSED_WHEN_SET"]

#: Fields honoured as Caffe 1.0 honours them.
HONOURED = frozenset({
    "net", "net_param", "train_net", "test_net", "train_net_param", "test_net_param",
    "train_state", "test_state", "test_iter", "test_interval", "test_compute_loss",
    "test_initialization", "base_lr", "display", "average_loss", "max_iter", "iter_size",
    "lr_policy", "gamma", "power", "momentum", "weight_decay", "regularization_type",
    "stepsize", "stepvalue", "clip_gradients", "snapshot", "snapshot_prefix",
    "snapshot_after_train", "snapshot_format", "solver_mode", "device_id", "random_seed",
    "type", "solver_type", "delta", "momentum2", "rms_decay", "debug_info", "snapshot_diff",
    "layer_wise_reduce", "weights",
})

#: Fields refused when set to anything but their harmless value, and why.
REFUSED_WHEN_SET = {
    "snapshot_diff": (True, "writing gradients into snapshots is not supported"),
    "snapshot_format": ("HDF5", "HDF5 snapshots are not written; use BINARYPROTO"),
    "debug_info": (True, "per-blob debug printing is not supported"),
    "eval_type": (None, "SSD's detection evaluation is not supported"),
    "ap_version": (None, "SSD's detection evaluation is not supported"),
    "show_per_class_result": (None, "SSD's detection evaluation is not supported"),
}

#: Caffe's solver types (surgery.train.optim implements each; not imported here: no torch).
SOLVER_TYPES = ("SGD", "Nesterov", "AdaGrad", "RMSProp", "AdaDelta", "Adam")

_LEGACY_TYPES = {"SGD": "SGD", "NESTEROV": "Nesterov", "ADAGRAD": "AdaGrad",
                 "RMSPROP": "RMSProp", "ADADELTA": "AdaDelta", "ADAM": "Adam"}


@dataclass
class SolverConfig:
    """A solver, resolved: nets loaded, defaults applied (Caffe's), paths made concrete."""

    path: Path | None
    train_net: Net
    train_state: NetState
    test_nets: list[Net] = field(default_factory=list)
    test_states: list[NetState] = field(default_factory=list)
    test_iter: list[int] = field(default_factory=list)
    test_interval: int = 0
    test_compute_loss: bool = False
    test_initialization: bool = True
    base_lr: float = 0.0
    display: int = 0
    average_loss: int = 1
    max_iter: int = 0
    iter_size: int = 1
    lr_policy: str = "fixed"
    gamma: float = 0.0
    power: float = 0.0
    momentum: float = 0.0
    weight_decay: float = 0.0
    regularization_type: str = "L2"
    stepsize: int = 0
    stepvalue: list[int] = field(default_factory=list)
    clip_gradients: float = -1.0
    snapshot: int = 0
    snapshot_prefix: str = ""
    snapshot_after_train: bool = True
    solver_mode: str = "GPU"
    device_id: int = 0
    random_seed: int = -1
    type: str = "SGD"
    delta: float = 1e-8
    momentum2: float = 0.999
    rms_decay: float = 0.99
    weights: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def lr_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`surgery.train.schedule.learning_rate`."""
        return {"base_lr": self.base_lr, "gamma": self.gamma, "power": self.power,
                "stepsize": self.stepsize, "stepvalue": list(self.stepvalue),
                "max_iter": self.max_iter}

    def optimizer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`surgery.train.optim.make_optimizer` (besides params)."""
        return {"lr": self.base_lr, "momentum": self.momentum,
                "weight_decay": self.weight_decay,
                "regularization": self.regularization_type, "iter_size": self.iter_size,
                "clip_gradients": self.clip_gradients, "delta": self.delta,
                "momentum2": self.momentum2, "rms_decay": self.rms_decay}

    def with_overrides(self, **kw: Any) -> SolverConfig:
        """A copy with some fields replaced (``max_iter``, ``base_lr``, ...)."""
        import dataclasses

        bad = [k for k in kw if k not in {f.name for f in dataclasses.fields(self)}]
        if bad:
            raise SolverError(f"unknown solver override(s): {', '.join(bad)}")
        return dataclasses.replace(self, **kw)


def _resolve_net_path(value: str, solver_dir: Path, what: str, notes: list[str]) -> Path:
    p = Path(value)
    if p.is_file():
        notes.append(f"{what}: {p} (relative to the working directory)")
        return p
    alt = solver_dir / value
    if not p.is_absolute() and alt.is_file():
        notes.append(f"{what}: {alt} (relative to the solver's folder)")
        return alt
    looked = str(p.resolve()) if p.is_absolute() else f"{Path.cwd() / p} and {alt.resolve()}"
    raise SolverError(f"{what}: {value!r} not found (looked at {looked}); fix the path in the "
                      "solver (Caffe resolves it from the working directory)")


def _state(d: dict[str, Any] | None, phase: str, base: dict[str, Any] | None = None) -> NetState:
    """Caffe's ``NetState`` merge: the net file's ``state``, then ``d``, phase forced."""
    level, stages = 0, []
    for src in (base or {}, d or {}):
        level = int(src.get("level", level))
        stages += list(src.get("stage", []))
    return NetState(phase, level, tuple(stages))


def load_solver(path: str | os.PathLike[str]) -> SolverConfig:
    """Read ``solver.prototxt`` and load the nets it names.

    Args:
        path: the solver file.

    Returns:
        The resolved :class:`SolverConfig` (``notes`` names the net files used and the
        snapshot prefix chosen).

    Raises:
        SolverError: refused or unknown fields (all named at once), a net that does not exist
            (both places looked at named), ``max_iter`` missing, ``test_iter`` without a test
            net, and the other configurations Caffe refuses.
        ParseError: the solver or a net file does not parse.
    """
    from .._inputs import check_regular
    from ..caffe_io import load, net_from_dict, read_solver, solver_defaults

    spath = Path(path)
    check_regular(spath, "solver")  # a FIFO or device would block the reader
    fields, unknown = read_solver(spath)
    return config_from_fields(fields, spath, unknown=unknown, load=load,
                              net_from_dict=net_from_dict, defaults=solver_defaults())


def config_from_fields(fields: dict[str, Any], spath: Path, *, unknown: list[str],
                       load: Any, net_from_dict: Any,
                       defaults: dict[str, Any] | None = None) -> SolverConfig:
    """:func:`load_solver` after parsing (for solvers built in code)."""
    where = str(spath)
    problems: list[str] = [f"{u} (not a SolverParameter field)" for u in unknown]
    for name, (harmless, why) in REFUSED_WHEN_SET.items():
        if name in fields and (harmless is None or fields[name] == harmless):
            problems.append(f"{name}: {fields[name]!r} ({why})")
    for name in fields:
        if name not in HONOURED and name not in REFUSED_WHEN_SET:
            problems.append(f"{name} (not supported)")
    if problems:
        raise SolverError(f"{where}: {len(problems)} solver field(s) refused: "
                          f"{'; '.join(problems)}. Remove or change them.")
    notes: list[str] = []
    f = dict(fields)
    # rule 3: legacy solver_type enum
    if "solver_type" in f:
        if "type" in f:
            raise SolverError(f"{where}: both the old solver_type ({f['solver_type']}) and type "
                              f"({f['type']!r}) are set; keep only type")
        f["type"] = _LEGACY_TYPES.get(str(f.pop("solver_type")), "SGD")
    errors: list[str] = []
    solver_type = f.get("type", "SGD")
    if solver_type not in SOLVER_TYPES:
        errors.append(f"type {solver_type!r} is unknown (Caffe knows {', '.join(SOLVER_TYPES)})")
    if "max_iter" not in f:
        errors.append("max_iter is missing (Caffe trains for max_iter iterations)")
    policy = f.get("lr_policy")
    if policy is None:
        errors.append(f"lr_policy is missing (one of {', '.join(POLICIES)})")
    elif policy not in POLICIES:
        errors.append(f"lr_policy {policy!r} is unknown (one of {', '.join(POLICIES)})")
    elif policy == "step" and f.get("stepsize", 0) <= 0:
        errors.append("lr_policy 'step' needs stepsize > 0")
    elif policy == "multistep" and not f.get("stepvalue"):
        errors.append("lr_policy 'multistep' needs stepvalue entries")
    elif policy == "poly" and f.get("max_iter", 0) <= 0:
        errors.append("lr_policy 'poly' needs max_iter > 0")
    for name, value in f.items():  # nan / inf learning rates, decays, momenta...
        if isinstance(value, float) and not math.isfinite(value):
            errors.append(f"{name} is {value}; it must be a finite number")
    if f.get("regularization_type", "L2") not in ("L1", "L2"):
        errors.append(f"regularization_type {f['regularization_type']!r} is unknown (L1 or L2)")
    if int(f.get("average_loss", 1)) < 1:
        errors.append("average_loss must be >= 1")
    if int(f.get("iter_size", 1)) < 1:
        errors.append("iter_size must be >= 1")
    if solver_type in ("AdaGrad", "RMSProp") and f.get("momentum", 0.0) != 0.0:
        errors.append(f"momentum cannot be used with {solver_type} (Caffe refuses it)")
    if solver_type == "RMSProp" and not 0 <= f.get("rms_decay", 0.99) < 1:
        errors.append("rms_decay must be in [0, 1)")
    sources = [k for k in ("train_net_param", "train_net", "net_param", "net") if k in f]
    if not sources:
        errors.append("no train net: set net (or train_net, net_param, train_net_param)")
    elif len(sources) > 1:
        errors.append(f"more than one train net: {', '.join(sources)}; keep one")
    if errors:
        raise SolverError(f"{where}: {'; '.join(errors)}")

    # rule 1: the train net
    solver_dir = spath.parent
    src = sources[0]
    if src.endswith("_param"):
        train_net = net_from_dict(f[src], f"{where} ({src})")
        notes.append(f"train net: inline {src}")
    else:
        train_net = load(_resolve_net_path(f[src], solver_dir, src, notes))
    train_state = _state(f.get("train_state"), "TRAIN", train_net.extra.get("state"))
    # rule 2: test nets
    test_nets: list[Net] = []
    for i, d in enumerate(f.get("test_net_param", [])):
        test_nets.append(net_from_dict(d, f"{where} (test_net_param #{i})"))
    for i, p in enumerate(f.get("test_net", [])):
        test_nets.append(load(_resolve_net_path(p, solver_dir, f"test_net #{i}", notes)))
    test_iter = [int(x) for x in f.get("test_iter", [])]
    if src in ("net", "net_param"):
        test_nets += [train_net] * max(0, len(test_iter) - len(test_nets))
    if len(test_iter) != len(test_nets):
        if not test_nets:
            raise SolverError(f"{where}: test_iter is set but there is no test net (train_net "
                              "without test_net); add test_net, use net:, or remove test_iter")
        raise SolverError(f"{where}: {len(test_nets)} test net(s) but {len(test_iter)} test_iter "
                          "entries; give one test_iter per test net")
    tstates = f.get("test_state", [])
    if tstates and len(tstates) != len(test_nets):
        raise SolverError(f"{where}: {len(tstates)} test_state entries for {len(test_nets)} "
                          "test net(s); give one per test net")
    test_states = [_state(tstates[i] if tstates else None, "TEST", n.extra.get("state"))
                   for i, n in enumerate(test_nets)]
    # rule 4: snapshot prefix
    prefix = f.get("snapshot_prefix")
    if prefix is None:
        prefix = str(spath.with_suffix(""))
        notes.append(f"snapshot_prefix not set: {prefix}")
    elif Path(prefix).is_dir():
        prefix = str(Path(prefix) / spath.stem)
        notes.append(f"snapshot_prefix is a folder: {prefix}")
    keys = {k for k in SolverConfig.__dataclass_fields__}
    simple = {k: v for k, v in {**(defaults or {}), **f}.items() if k in keys and k not in (
        "train_net", "test_nets", "train_state", "test_states", "test_iter", "snapshot_prefix",
        "stepvalue", "weights")}
    return SolverConfig(
        path=spath, train_net=train_net, train_state=train_state, test_nets=test_nets,
        test_states=test_states, test_iter=test_iter, snapshot_prefix=prefix,
        stepvalue=[int(x) for x in f.get("stepvalue", [])],
        weights=list(f.get("weights", [])), notes=notes, **simple)
