"""Caffe's learning-rate policies as pure functions of the iteration.

``SGDSolver::GetLearningRate`` (``sgd_solver.cpp``), formula by formula, in Caffe's float
arithmetic: ``Dtype`` is float, and ``std::pow(float, int)`` promotes to double before the
result is stored back into a float, so every value here is rounded the way Caffe rounds it.
``iter`` is the number of updates done so far (Caffe's ``iter_``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["POLICIES", "learning_rate", "current_step"]

#: The lr_policy values Caffe 1.0 knows.
POLICIES = ("fixed", "step", "exp", "inv", "multistep", "poly", "sigmoid")

_f32 = np.float32


def current_step(policy: str, iter: int, *, stepsize: int = 0,
                 stepvalue: Sequence[int] = ()) -> int:
    """Caffe's ``current_step_`` after ``GetLearningRate`` at ``iter`` (saved in solverstates).

    ``step``: ``iter / stepsize``; ``multistep``: the number of ``stepvalue`` entries reached
    (Caffe advances one entry per call, which equals this count for increasing step values
    when the rate is asked every iteration); other policies: 0.
    """
    if policy == "step":
        return iter // stepsize if stepsize > 0 else 0
    if policy == "multistep":
        k = 0
        while k < len(stepvalue) and iter >= stepvalue[k]:
            k += 1
        return k
    return 0


def learning_rate(
    policy: str,
    iter: int,
    *,
    base_lr: float,
    gamma: float = 0.0,
    power: float = 0.0,
    stepsize: int = 0,
    stepvalue: Sequence[int] = (),
    max_iter: int = 0,
) -> float:
    """The rate Caffe uses for the update after ``iter`` updates.

    Policies (``base`` = base_lr): fixed ``base``; step ``base * gamma^floor(iter/stepsize)``;
    exp ``base * gamma^iter``; inv ``base * (1 + gamma*iter)^-power``; multistep
    ``base * gamma^k`` (k = step values reached); poly ``base * (1 - iter/max_iter)^power``;
    sigmoid ``base / (1 + exp(-gamma * (iter - stepsize)))``.

    Raises:
        ValueError: an unknown policy (the solver config refuses it first, with the file).
    """
    base = _f32(base_lr)
    g = _f32(gamma)
    if policy == "fixed":
        rate = base
    elif policy in ("step", "multistep"):
        k = current_step(policy, iter, stepsize=stepsize, stepvalue=stepvalue)
        rate = _f32(float(base) * float(g) ** k)
    elif policy == "exp":
        rate = _f32(float(base) * float(g) ** iter)
    elif policy == "inv":
        with np.errstate(all="ignore"):
            rate = base * np.power(_f32(1) + g * _f32(iter), -_f32(power))
    elif policy == "poly":
        with np.errstate(all="ignore"):
            rate = base * np.power(_f32(1) - _f32(iter) / _f32(max_iter), _f32(power))
    elif policy == "sigmoid":
        with np.errstate(all="ignore"):
            rate = base * (_f32(1) / (_f32(1) + np.exp(-g * (_f32(iter) - _f32(stepsize)))))
    else:
        raise ValueError(f"unknown lr_policy {policy!r}; Caffe knows {', '.join(POLICIES)}")
    return float(_f32(rate))
