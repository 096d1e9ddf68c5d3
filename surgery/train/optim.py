"""Caffe's solver updates as ``torch.optim.Optimizer`` subclasses.

Each ``step()`` is Caffe's ``ApplyUpdate`` (``sgd_solver.cpp`` and the other solvers), in
Caffe's order, on the accumulated gradients:

1. clip (``clip_gradients`` >= 0): scale every gradient by ``clip / norm`` when the global L2
   norm of all of them is larger -- on the *summed* ``iter_size`` gradient, before step 2;
2. normalise: ``grad /= iter_size``;
3. regularise with ``local_decay = weight_decay * decay_mult`` (the group's ``weight_decay``):
   L2 ``grad += local_decay * w``, L1 ``grad += local_decay * sign(w)``;
4. the solver type's update with ``local_rate = rate * lr_mult`` (the group's ``lr``) where
   Caffe puts it -- for SGD *inside* the momentum history (``h = momentum*h + local_rate*grad``),
   which ``torch.optim.SGD`` does not do;
5. ``w -= update``.

Groups carry ``lr_mult``/``decay_mult`` (as :func:`surgery.export.torch.param_groups` gives
them); :meth:`CaffeOptimizer.set_rate` sets every group's ``lr`` to ``rate * lr_mult`` from the
lr policy. The work is multi-tensor (``torch._foreach_*``), one launch per operation and group,
like ``torch.optim.SGD(foreach=True)``. Parameters with ``requires_grad=False`` (frozen,
``lr_mult: 0``) are skipped: Caffe's update leaves them unchanged too. A trainable parameter
that got no gradient (no loss reaches it) is updated with a zero gradient, as Caffe updates a
zero diff (weight decay and momentum still apply).

History tensors (``state[p]["history"]``, plus ``"update_history"`` for AdaDelta and Adam's
second moment) are Caffe's ``history_`` blobs, in the layout a ``.solverstate`` stores.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

__all__ = [
    "CaffeOptimizer",
    "SGD",
    "Nesterov",
    "AdaGrad",
    "RMSProp",
    "AdaDelta",
    "Adam",
    "SOLVER_TYPES",
    "make_optimizer",
]


def _f32(x: float) -> float:
    """``x`` rounded to float32: Caffe's hyper-parameters are ``float``."""
    return float(np.float32(x))


def _one_minus(x: float) -> float:
    """Caffe's ``Dtype(1) - x`` in float32 (``1 - 0.999`` is 0.00099998713 there)."""
    return float(np.float32(1) - np.float32(x))


def _by_device(*lists: list[torch.Tensor]) -> list[tuple[list[torch.Tensor], ...]]:
    """Split parallel tensor lists into runs of one device and dtype (foreach's requirement)."""
    buckets: dict[tuple[Any, Any], tuple[list[torch.Tensor], ...]] = {}
    for items in zip(*lists, strict=True):
        key = (items[0].device, items[0].dtype)
        b = buckets.setdefault(key, tuple([] for _ in lists))
        for dst, t in zip(b, items, strict=True):
            dst.append(t)
    return list(buckets.values())


class CaffeOptimizer(torch.optim.Optimizer):
    """The common part of Caffe's solvers: clip, normalise, regularise, then :meth:`_update`.

    Args:
        params: parameters or groups; a group may set ``lr_mult`` and ``decay_mult``
            (default 1), ``lr`` and ``weight_decay`` (default ``rate * lr_mult`` and
            ``weight_decay * decay_mult``).
        lr: the current rate (Caffe's ``rate``, from the lr policy; see :meth:`set_rate`).
        momentum: SGD/Nesterov momentum, AdaDelta's decay, Adam's beta1.
        weight_decay: the solver's ``weight_decay``.
        regularization: ``"L2"`` or ``"L1"``.
        iter_size: gradients are divided by it (they are sums over ``iter_size`` passes).
        clip_gradients: clip the global L2 norm to this; negative disables (Caffe's -1).
        delta: AdaGrad/RMSProp/AdaDelta's delta, Adam's epsilon.
        momentum2: Adam's beta2.
        rms_decay: RMSProp's decay.
    """

    type_name = "base"
    histories = 1  # history blobs per parameter in a solverstate

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.01,
        *,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        regularization: str = "L2",
        iter_size: int = 1,
        clip_gradients: float = -1.0,
        delta: float = 1e-8,
        momentum2: float = 0.999,
        rms_decay: float = 0.99,
    ) -> None:
        if regularization not in ("L1", "L2"):
            raise ValueError(f"regularization must be 'L1' or 'L2', not {regularization!r}")
        if iter_size < 1:
            raise ValueError("iter_size must be >= 1")
        defaults = {"lr": lr, "lr_mult": 1.0, "decay_mult": 1.0, "weight_decay": None,
                    "momentum": momentum, "delta": delta, "momentum2": momentum2,
                    "rms_decay": rms_decay}
        self.base_weight_decay = float(weight_decay)
        self.regularization = regularization
        self.iter_size = int(iter_size)
        self.clip_gradients = float(clip_gradients)
        #: Caffe's ``iter_``: updates done (Adam's bias correction uses ``iter + 1``).
        self.iteration = 0
        self.rate = float(lr)
        super().__init__(params, defaults)
        for g in self.param_groups:
            if g["weight_decay"] is None:
                g["weight_decay"] = self.base_weight_decay * g["decay_mult"]
        self.set_rate(lr)

    def set_rate(self, rate: float) -> None:
        """Set Caffe's ``rate``: every group's ``lr`` becomes ``rate * lr_mult``."""
        self.rate = float(rate)
        for g in self.param_groups:
            g["lr"] = self.rate * g["lr_mult"]

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["caffe"] = {"iteration": self.iteration, "rate": self.rate}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        extra = state_dict.get("caffe", {})
        sd = {k: v for k, v in state_dict.items() if k != "caffe"}
        super().load_state_dict(sd)
        self.iteration = int(extra.get("iteration", self.iteration))
        self.rate = float(extra.get("rate", self.rate))

    def history(self, p: torch.Tensor, key: str = "history") -> torch.Tensor:
        """The history tensor ``key`` of ``p`` (zeros, created on first use)."""
        st = self.state[p]
        if key not in st:
            st[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return st[key]

    def _grads(self) -> list[tuple[dict[str, Any], list[torch.Tensor], list[torch.Tensor]]]:
        out = []
        for g in self.param_groups:
            for p in g["params"]:
                # Caffe: a learnable blob no loss reaches has a zero diff, and is still decayed
                if p.grad is None and p.requires_grad:
                    p.grad = torch.zeros_like(p)
            ps = [p for p in g["params"] if p.grad is not None]
            if ps:
                out.append((g, ps, [p.grad for p in ps]))
        return out

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # noqa: D102 (torch's contract)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = self._grads()
        # 1. clip on the global L2 norm (before normalising: Caffe's order)
        if self.clip_gradients >= 0 and groups:
            norms = [n for _, _, gs in groups for n in torch._foreach_norm(gs)]
            dev = norms[0].device
            total = torch.linalg.vector_norm(torch.stack([n.to(dev) for n in norms]))
            scale = torch.where(total > self.clip_gradients,
                                self.clip_gradients / total, torch.ones_like(total))
            for _, _, gs in groups:
                for (gg,) in _by_device(gs):
                    torch._foreach_mul_(gg, scale.to(gg[0].device))
        for g, ps, gs in groups:
            for p_run, g_run in _by_device(ps, gs):
                # 2. normalise by iter_size
                if self.iter_size != 1:
                    torch._foreach_mul_(g_run, 1.0 / self.iter_size)
                # 3. regularise
                decay = g["weight_decay"]
                if decay:
                    if self.regularization == "L2":
                        torch._foreach_add_(g_run, p_run, alpha=decay)
                    else:
                        torch._foreach_add_(g_run, torch._foreach_sign(p_run), alpha=decay)
                # 4. the type's update, 5. w -= update
                torch._foreach_sub_(p_run, self._update(g, p_run, g_run))
        self.iteration += 1
        return loss

    def _update(self, group: dict[str, Any], params: list[torch.Tensor],
                grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """The update to subtract (Caffe's final diff); may reuse ``grads``' storage."""
        raise NotImplementedError


class SGD(CaffeOptimizer):
    """Caffe's SGD: ``h = momentum*h + local_rate*grad; w -= h``."""

    type_name = "SGD"

    def _update(self, group, params, grads):  # type: ignore[no-untyped-def]
        h = [self.history(p) for p in params]
        torch._foreach_mul_(h, group["momentum"])
        torch._foreach_add_(h, grads, alpha=group["lr"])
        return h


class Nesterov(CaffeOptimizer):
    """Caffe's Nesterov: ``h' = momentum*h + local_rate*grad``;
    ``update = (1+momentum)*h' - momentum*h``."""

    type_name = "Nesterov"

    def _update(self, group, params, grads):  # type: ignore[no-untyped-def]
        m = group["momentum"]
        h = [self.history(p) for p in params]
        prev = torch._foreach_mul(h, -m)
        torch._foreach_mul_(h, m)
        torch._foreach_add_(h, grads, alpha=group["lr"])
        torch._foreach_add_(prev, h, alpha=float(np.float32(1) + np.float32(m)))
        return prev


class AdaGrad(CaffeOptimizer):
    """Caffe's AdaGrad: ``h += grad^2; update = local_rate * grad / (sqrt(h) + delta)``."""

    type_name = "AdaGrad"

    def _update(self, group, params, grads):  # type: ignore[no-untyped-def]
        h = [self.history(p) for p in params]
        torch._foreach_addcmul_(h, grads, grads)
        den = torch._foreach_sqrt(h)
        torch._foreach_add_(den, group["delta"])
        torch._foreach_div_(grads, den)
        torch._foreach_mul_(grads, group["lr"])
        return grads


class RMSProp(CaffeOptimizer):
    """Caffe's RMSProp: ``h = rms_decay*h + (1-rms_decay)*grad^2``;
    ``update = local_rate * grad / (sqrt(h) + delta)``."""

    type_name = "RMSProp"

    def _update(self, group, params, grads):  # type: ignore[no-untyped-def]
        d = group["rms_decay"]
        h = [self.history(p) for p in params]
        torch._foreach_mul_(h, d)
        torch._foreach_addcmul_(h, grads, grads, value=_one_minus(d))
        den = torch._foreach_sqrt(h)
        torch._foreach_add_(den, group["delta"])
        torch._foreach_div_(grads, den)
        torch._foreach_mul_(grads, group["lr"])
        return grads


class AdaDelta(CaffeOptimizer):
    """Caffe's AdaDelta (``momentum`` is the decay):
    ``h = m*h + (1-m)*grad^2; u = grad * sqrt((hu + delta) / (h + delta));
    hu = m*hu + (1-m)*u^2; update = local_rate * u``."""

    type_name = "AdaDelta"
    histories = 2

    def _update(self, group, params, grads):  # type: ignore[no-untyped-def]
        m, delta = group["momentum"], group["delta"]
        h = [self.history(p) for p in params]
        hu = [self.history(p, "update_history") for p in params]
        torch._foreach_mul_(h, m)
        torch._foreach_addcmul_(h, grads, grads, value=_one_minus(m))
        num = torch._foreach_add(hu, delta)
        den = torch._foreach_add(h, delta)
        torch._foreach_div_(num, den)
        torch._foreach_sqrt_(num)
        torch._foreach_mul_(grads, num)
        torch._foreach_mul_(hu, m)
        torch._foreach_addcmul_(hu, grads, grads, value=_one_minus(m))
        torch._foreach_mul_(grads, group["lr"])
        return grads


class Adam(CaffeOptimizer):
    """Caffe's Adam (``momentum`` = beta1, ``momentum2`` = beta2, ``delta`` = epsilon):
    ``m = b1*m + (1-b1)*grad; v = b2*v + (1-b2)*grad^2``;
    ``update = local_rate * sqrt(1-b2^t)/(1-b1^t) * m / (sqrt(v) + eps)``, ``t = iter + 1``."""

    type_name = "Adam"
    histories = 2

    def _update(self, group, params, grads):  # type: ignore[no-untyped-def]
        b1, b2, eps = group["momentum"], group["momentum2"], group["delta"]
        t = self.iteration + 1
        correction = _f32(math.sqrt(1.0 - _f32(b2) ** t) / (1.0 - _f32(b1) ** t))
        m = [self.history(p) for p in params]
        v = [self.history(p, "update_history") for p in params]
        torch._foreach_mul_(m, b1)
        torch._foreach_add_(m, grads, alpha=_one_minus(b1))
        torch._foreach_mul_(v, b2)
        torch._foreach_addcmul_(v, grads, grads, value=_one_minus(b2))
        den = torch._foreach_sqrt(v)
        torch._foreach_add_(den, eps)
        upd = torch._foreach_div(m, den)
        torch._foreach_mul_(upd, group["lr"] * correction)
        return upd


#: Caffe's solver ``type`` names (and the legacy ``solver_type`` enum names) -> class.
SOLVER_TYPES: dict[str, type[CaffeOptimizer]] = {
    "SGD": SGD, "Nesterov": Nesterov, "AdaGrad": AdaGrad, "RMSProp": RMSProp,
    "AdaDelta": AdaDelta, "Adam": Adam,
}


def make_optimizer(type_name: str, params: Iterable[Any], **kwargs: Any) -> CaffeOptimizer:
    """The optimizer for a Caffe solver ``type`` (``"SGD"``, ``"Adam"``, ...).

    Raises:
        ValueError: an unknown type.
    """
    try:
        cls = SOLVER_TYPES[type_name]
    except KeyError:
        raise ValueError(f"unknown solver type {type_name!r}; Caffe knows "
                         f"{', '.join(SOLVER_TYPES)}") from None
    return cls(params, **kwargs)
