"""Training with Caffe's solver semantics in PyTorch (``surgery train``).

``solver`` reads ``solver.prototxt``; ``schedule`` holds the lr policies; ``optim`` Caffe's
updates as ``torch.optim.Optimizer`` subclasses; ``loop`` the :class:`Trainer` (Caffe's
``Solver::Step``); ``snapshot`` caffemodel + SolverState; ``distributed`` torchrun/DDP.
Nothing below this package imports it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Trainer", "load_solver", "SolverConfig"]


def __getattr__(name: str) -> Any:  # torch is imported only when training is asked for
    if name == "Trainer":
        from .loop import Trainer

        return Trainer
    if name in ("load_solver", "SolverConfig"):
        from . import solver

        return getattr(solver, name)
    raise AttributeError(name)
