"""Fine-tuning an exported model in PyTorch: optimizer groups, freeze/unfreeze, BatchNorm.

The same functions work on a module from :func:`surgery.export.to_torch`, the ``CaffeNet`` of
a generated ``model.py`` (which carries copies of them: ``param_groups``, ``set_trainable``,
``freeze_bn``), and either wrapped by ``torch.compile`` or ``DistributedDataParallel``.

Each model carries two tables: ``caffe_lr`` (parameter name -> ``(lr_mult, decay_mult)``,
from the Caffe ``param { }`` specs) and ``caffe_names`` (parameter/buffer name -> ``{"layer",
"blob"}``). Freezing and unfreezing act on ``requires_grad`` and on ``caffe_lr``;
:func:`param_groups` reads both, so the optimizer built after each stage trains exactly the
parameters that have ``requires_grad=True``.

The freeze-then-unfreeze recipe::

    model = to_torch(frozen_net, "train")             # stage 1: lr_mult 0 -> requires_grad off
    opt = torch.optim.SGD(param_groups(model, 0.01), lr=0.01, momentum=0.9)
    ...                                               # train the head
    set_trainable(model)                              # stage 2: every layer learns (1/1)
    opt = torch.optim.SGD(param_groups(model, 0.001), lr=0.001, momentum=0.9)

Rebuild the optimizer after :func:`set_trainable`: an optimizer only updates the parameters it
was given.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn

from ..errors import LayerNotFoundError, SurgeryError, did_you_mean
from . import _torch_runtime as rt

__all__ = ["param_groups", "set_trainable", "freeze_bn", "trainable_count"]

Mult = float | Sequence[float] | None
Globs = str | Iterable[str] | None


def param_groups(
    model: nn.Module,
    base_lr: float,
    weight_decay: float = 0.0,
    *,
    unfrozen: tuple[float, float] = (1.0, 1.0),
) -> list[dict[str, Any]]:
    """Optimizer parameter groups with Caffe's multipliers, following ``requires_grad`` now.

    Rules:

    1. A parameter with ``requires_grad=False`` is left out (frozen in Caffe, or by
       :func:`set_trainable` with ``trainable=False``, or by hand).
    2. A trainable parameter takes ``(lr_mult, decay_mult)`` from ``model.caffe_lr``.
    3. A trainable parameter whose entry has ``lr_mult`` 0 -- frozen in Caffe, made trainable
       in torch since (``p.requires_grad_(True)``) -- takes ``unfrozen``: Caffe's defaults
       ``(1, 1)``, as ``surgery unfreeze`` writes. :func:`set_trainable` sets other values.
    4. One group per pair, with ``lr = base_lr * lr_mult`` and
       ``weight_decay = weight_decay * decay_mult``; each group also carries ``lr_mult``,
       ``decay_mult`` and the parameter ``names``.

    Args:
        model: a module from :func:`~surgery.export.to_torch`, a generated ``model.py``'s
            module, or either wrapped by ``torch.compile``/DDP.
        base_lr: the solver's ``base_lr``.
        weight_decay: the solver's ``weight_decay``.
        unfrozen: ``(lr_mult, decay_mult)`` for rule 3.

    Returns:
        The groups, ready for ``torch.optim.SGD(groups, lr=base_lr)``.
    """
    return rt.caffe_param_groups(model, base_lr, weight_decay, tuple(unfrozen))


def trainable_count(model: nn.Module) -> tuple[int, int]:
    """``(trainable parameters, all parameters)``, counted in values (shared blobs once)."""
    inner, _, _ = rt.caffe_tables(model)
    params = list(inner.parameters())
    return (sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))


def _check_globs(model: nn.Module, globs: Globs, what: str, bn: bool) -> None:
    """Every glob must match a layer: LayerNotFoundError with a did-you-mean otherwise."""
    if globs is None:
        return
    inner, _, names = rt.caffe_tables(model)
    if bn:
        pool = [(rt.caffe_layer_of(names, f"{m}.running_mean"), m)
                for m, mod in inner.named_modules()
                if type(mod).__name__ in ("CaffeBatchNorm", "CaffeBN")]
        kind = "BatchNorm "
    else:
        pool = [(rt.caffe_layer_of(names, k), k.rsplit(".", 1)[0])
                for k, _ in inner.named_parameters(remove_duplicate=False)]
        kind = "learnable "
    for pat in [globs] if isinstance(globs, str) else list(globs):
        if not any(rt.caffe_match(lay, mod, pat) for lay, mod in pool):
            glob = any(c in pat for c in "*?[")
            msg = (f"{what}: glob {pat!r} matches no {kind}layer" if glob
                   else f"{what}: no {kind}layer named {pat!r}")
            raise LayerNotFoundError(msg + did_you_mean(pat, dict.fromkeys(lay for lay, _ in pool)))


def set_trainable(
    model: nn.Module,
    layers: Globs = None,
    *,
    trainable: bool = True,
    lr_mult: Mult = None,
    decay_mult: Mult = None,
    except_: Globs = None,
) -> list[str]:
    """Stage 2 of freeze-then-unfreeze in one call: ``requires_grad`` and the multipliers.

    Rules:

    1. Selection: ``layers`` are Caffe layer names or globs (``"inception_4*"``; the sanitized
       module names match too); None selects every layer with parameters; ``except_`` globs
       are removed. Each glob must match a layer with parameters.
    2. ``trainable=True``: every parameter of the selection gets ``requires_grad=True``;
       ``lr_mult``/``decay_mult`` (W, or (W, B): blob 0 gets W, the other blobs B) are written
       into ``model.caffe_lr`` when given; otherwise a blob frozen in Caffe (lr_mult 0) gets
       ``1/1`` (as ``surgery unfreeze``) and a blob already learning keeps its multipliers (a
       bias at 2/0 stays 2/0).
    3. ``trainable=False``: ``requires_grad=False``; the multipliers are kept, so a later
       ``trainable=True`` restores them.
    4. Shared blobs (``param { name }``) are one parameter: set once for every layer.
    5. Build the optimizer again from :func:`param_groups` afterwards.

    Args:
        model: an exported module (see :func:`param_groups`).
        layers: names or globs; None for all.
        trainable: learn (True) or freeze (False).
        lr_mult: W or (W, B); not 0 (freeze with ``trainable=False``).
        decay_mult: W or (W, B).
        except_: names or globs to leave as they are.

    Returns:
        The parameter names changed, in module order.

    Raises:
        LayerNotFoundError: a name or glob matches no layer with parameters.
        SurgeryError: a negative or zero ``lr_mult``, a negative ``decay_mult``, or
            multipliers with ``trainable=False``.
    """
    _check_globs(model, layers, "layers", bn=False)
    _check_globs(model, except_, "except_", bn=False)
    try:
        return rt.caffe_set_trainable(model, layers, trainable, lr_mult, decay_mult, except_)
    except (ValueError, TypeError) as exc:
        raise SurgeryError(f"set_trainable: {exc}") from None


def freeze_bn(model: nn.Module, layers: Globs = None, *, fixed: bool = True) -> list[str]:
    """Keep BatchNorm statistics fixed while training: Caffe's ``use_global_stats: true``.

    Caffe's BatchNorm normalises with the batch's statistics in TRAIN (and updates its moving
    averages) unless the layer says ``use_global_stats: true``; the exported module does the
    same under ``model.train()``. When a frozen trunk is fine-tuned with small batches, the
    stored statistics should usually stay: this pins the selected layers to them (no update,
    whatever ``model.train()``/``eval()`` say). The Caffe-side equivalent is ``surgery freeze
    --bn-stats``, which writes ``use_global_stats: true`` (the export then pins them too).

    Args:
        model: an exported module (see :func:`param_groups`).
        layers: Caffe layer names or globs of BatchNorm layers; None for all.
        fixed: True pins the stored statistics; False returns the layers to Caffe's default
            (the batch's statistics in TRAIN, the stored ones in TEST).

    Returns:
        The Caffe layer names changed. The forks' ``BN`` is included when it has stored
        statistics (PSPNet, through its ``frozen`` flag); SegNet's ``BN`` has none and is
        never fixed.

    Raises:
        LayerNotFoundError: a name or glob matches no BatchNorm layer.
    """
    _check_globs(model, layers, "layers", bn=True)
    try:
        return rt.caffe_freeze_bn(model, layers, fixed)
    except ValueError as exc:
        raise LayerNotFoundError(f"freeze_bn: {exc}") from None
