"""Staged fine-tuning: a recipe's ``[[train]]`` stages, run in order, weights carried over.

The recipe every transfer-learning guide gives -- train the new heads with the trunk frozen,
then everything at a lower rate -- as part of a ``surgery apply`` recipe::

    solver = "solver.prototxt"     # its net is replaced by the recipe's net (TRAIN and TEST)

    [[train]]
    name = "heads"
    surgery = [{ op = "freeze", layers = ["*"], except = ["*_ft"] }]
    max_iter = 200
    base_lr = 0.01

    [[train]]
    name = "all"
    surgery = [{ op = "unfreeze", layers = ["*"] }]
    max_iter = 400
    base_lr = 0.001

Rules:

1. The stages start from the net the recipe's ``[[step]]`` s made (with its weights).
2. Each stage applies its ``surgery`` steps (any recipe op, usually freeze / unfreeze / lr) to
   the net *as the previous stage left it* (definition and trained weights), then trains with
   the solver (the stage's ``solver`` or the recipe's), whose net -- train and test -- is
   replaced by that net. Stage keys among :data:`OVERRIDES` replace the solver's fields.
3. Snapshots go to ``<snapshot_prefix>_<stage name>_iter_<N>`` (stage names default to
   ``stage1``, ``stage2``...).
4. Every stage is validated before the first one trains.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..errors import SolverError
from ..net import Net
from .solver import load_solver

__all__ = ["OVERRIDES", "validate_stages", "run_stages"]

#: Solver fields a stage may override.
OVERRIDES = frozenset({"max_iter", "base_lr", "lr_policy", "gamma", "power", "stepsize",
                       "stepvalue", "momentum", "weight_decay", "test_interval", "display",
                       "snapshot", "iter_size", "type", "average_loss"})
_KEYS = OVERRIDES | {"name", "surgery", "solver"}


def validate_stages(recipe: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The recipe's ``train`` stages, checked (names, keys, a solver for each).

    Raises:
        SolverError: an unknown key, a missing solver, a malformed ``surgery`` list.
    """
    from ..ops.recipe import validate_recipe

    stages = recipe.get("train", [])
    if not isinstance(stages, list) or not all(isinstance(s, Mapping) for s in stages):
        raise SolverError("recipe: train must be a list of [[train]] tables")
    out = []
    for i, st in enumerate(stages, 1):
        bad = sorted(k for k in st if k not in _KEYS)
        if bad:
            raise SolverError(f"recipe: train stage {i}: unknown key(s) {', '.join(bad)}; "
                              f"valid: {', '.join(sorted(_KEYS))}")
        if not (st.get("solver") or recipe.get("solver")):
            raise SolverError(f"recipe: train stage {i}: no solver (set solver = \"...\" in "
                              "the recipe or the stage)")
        steps = st.get("surgery", [])
        if not isinstance(steps, list):
            raise SolverError(f"recipe: train stage {i}: surgery must be a list of steps")
        if steps:
            validate_recipe({"step": steps})
        out.append({**st, "name": str(st.get("name", f"stage{i}"))})
    return out


def run_stages(
    recipe: Mapping[str, Any],
    net: Net,
    *,
    base_dir: str | os.PathLike[str],
    device: str | None = None,
    log: Callable[[str], None] | None = None,
    **trainer_kwargs: Any,
) -> tuple[Net, list[dict[str, Any]]]:
    """Run the recipe's ``[[train]]`` stages in order (see the module's rules).

    Args:
        recipe: the recipe (its ``train`` list and ``solver``).
        net: the net to start from (the recipe's steps applied, with weights).
        base_dir: the recipe's folder (relative ``solver`` paths resolve against it).
        device: the torch device.
        log: where the training lines go (default: stdout).
        trainer_kwargs: passed to :class:`~surgery.train.loop.Trainer` (``datasets``...).

    Returns:
        ``(net after the last stage, one summary per stage)``; a summary has ``name``,
        ``iterations``, ``snapshot`` (the last caffemodel) and ``trainable`` (blobs updated).

    Raises:
        SolverError, SurgeryError: a bad stage, solver or step (before any training when
            it can be known).
    """
    from ..ops.recipe import apply_recipe
    from .loop import Trainer

    stages = validate_stages(recipe)
    base = Path(base_dir)
    configs = []
    for st in stages:  # rule 4: every solver read before training starts
        sp = Path(st.get("solver") or recipe["solver"])
        configs.append(load_solver(sp if sp.is_absolute() else base / sp))
    summaries: list[dict[str, Any]] = []
    say = log or print
    for st, cfg in zip(stages, configs, strict=True):
        say(f"== train stage {st['name']!r} ==")
        if st.get("surgery"):
            net, _ = apply_recipe({"step": st["surgery"]}, net, base_dir=base, write=False)
        over = {k: v for k, v in st.items() if k in OVERRIDES}
        if "stepvalue" in over:
            over["stepvalue"] = [int(x) for x in over["stepvalue"]]
        cfg = cfg.with_overrides(
            train_net=net, test_nets=[net] * len(cfg.test_iter),
            snapshot_prefix=f"{cfg.snapshot_prefix}_{st['name']}", **over)
        trainer = Trainer(cfg, device=device, log=say, **trainer_kwargs)
        trainer.solve()
        net = trainer.current_net()
        summaries.append({"name": st["name"], "iterations": trainer.iter,
                          "snapshot": str(trainer.last_snapshot) if trainer.last_snapshot
                          else None,
                          "trainable": sum(p.numel() for p in trainer.model.parameters()
                                           if p.requires_grad)})
        trainer.close()
    return net, summaries
