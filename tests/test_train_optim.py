"""Caffe's solver updates (surgery.train.optim) against an independent numpy transcription.

The reference below follows Caffe's C++ (sgd_solver.cpp, nesterov_solver.cpp, adagrad_solver.cpp,
rmsprop_solver.cpp, adadelta_solver.cpp, adam_solver.cpp) statement by statement, one blob at a
time, in float32: ClipGradients, then per blob Normalize, Regularize, ComputeUpdateValue,
then Net::Update (w -= diff). Tolerance: 1e-5 relative (float32 re-association only).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the `train` extra

from surgery.train import optim, schedule  # noqa: E402

f32 = np.float32


def caffe_apply_update(kind, params, diffs, hist, lr_mults, decay_mults, *, rate, it, momentum,
                       weight_decay, reg, iter_size, clip, delta, momentum2, rms_decay):
    """One ApplyUpdate in numpy. ``hist`` has 2N entries for AdaDelta/Adam, N otherwise."""
    n = len(params)
    diffs = [d.astype(f32).copy() for d in diffs]
    if clip >= 0:  # ClipGradients
        sumsq = f32(0)
        for d in diffs:
            sumsq += f32(np.dot(d.ravel(), d.ravel()))
        l2 = f32(math.sqrt(sumsq))
        if l2 > clip:
            s = f32(clip) / l2
            diffs = [d * s for d in diffs]
    for i in range(n):
        w, d = params[i], diffs[i]
        if iter_size != 1:  # Normalize
            d *= f32(1.0 / iter_size)
        local_decay = f32(weight_decay) * f32(decay_mults[i])  # Regularize
        if local_decay:
            if reg == "L2":
                d += local_decay * w
            else:
                d += local_decay * np.sign(w)
        lr = f32(rate) * f32(lr_mults[i])  # ComputeUpdateValue
        h = hist[i]
        if kind == "SGD":
            h[...] = lr * d + f32(momentum) * h
            d = h.copy()
        elif kind == "Nesterov":
            upd = h.copy()
            h[...] = lr * d + f32(momentum) * h
            upd = (f32(1) + f32(momentum)) * h + (-f32(momentum)) * upd
            d = upd
        elif kind == "AdaGrad":
            upd = d ** 2
            h += upd
            upd = np.sqrt(h) + f32(delta)
            d = lr * (d / upd)
        elif kind == "RMSProp":
            upd = d ** 2
            h[...] = (f32(1) - f32(rms_decay)) * upd + f32(rms_decay) * h
            upd = np.sqrt(h) + f32(delta)
            d = lr * (d / upd)
        elif kind == "AdaDelta":
            hu = hist[n + i]
            upd = d ** 2
            h[...] = (f32(1) - f32(momentum)) * upd + f32(momentum) * h
            temp = np.full_like(d, f32(delta))
            upd = temp + hu
            temp = temp + h
            upd = np.sqrt(upd / temp)
            d = d * upd
            upd = d ** 2
            hu[...] = (f32(1) - f32(momentum)) * upd + f32(momentum) * hu
            d = lr * d
        elif kind == "Adam":
            m, v = h, hist[n + i]
            t = it + 1
            corr = f32(math.sqrt(1.0 - float(f32(momentum2)) ** t)
                       / (1.0 - float(f32(momentum)) ** t))
            m[...] = (f32(1) - f32(momentum)) * d + f32(momentum) * m
            tmp = d * d
            v[...] = (f32(1) - f32(momentum2)) * tmp + f32(momentum2) * v
            tmp = np.sqrt(v) + f32(delta)
            d = (lr * corr) * (m / tmp)
        params[i] = w - d


@pytest.mark.parametrize("kind", list(optim.SOLVER_TYPES))
@pytest.mark.parametrize("variant", ["plain", "iter_size_clip_l1", "mults"])
def test_update_equals_caffe_transcription(kind: str, variant: str) -> None:
    rng = np.random.default_rng(7)
    shapes = [(4, 3), (4,), (2, 5), (5,)]
    init = [rng.standard_normal(s).astype(f32) for s in shapes]
    lr_mults = [1.0, 2.0, 1.0, 0.5] if variant == "mults" else [1.0] * 4
    decay_mults = [1.0, 0.0, 2.0, 1.0] if variant == "mults" else [1.0] * 4
    iter_size = 3 if variant == "iter_size_clip_l1" else 1
    clip = 0.5 if variant == "iter_size_clip_l1" else -1.0
    reg = "L1" if variant == "iter_size_clip_l1" else "L2"
    momentum = 0.95 if kind == "AdaDelta" else 0.9
    base_lr = 1.0 if kind == "AdaDelta" else 0.05
    hp = dict(momentum=momentum, weight_decay=5e-3, reg=reg, iter_size=iter_size, clip=clip,
              delta=1e-6 if kind == "AdaDelta" else 1e-8, momentum2=0.999, rms_decay=0.98)
    ts = [torch.nn.Parameter(torch.from_numpy(a.copy())) for a in init]
    groups = [{"params": [p], "lr_mult": lm, "decay_mult": dm}
              for p, lm, dm in zip(ts, lr_mults, decay_mults, strict=True)]
    opt = optim.make_optimizer(
        kind, groups, lr=base_lr, momentum=hp["momentum"], weight_decay=hp["weight_decay"],
        regularization=reg, iter_size=iter_size, clip_gradients=clip, delta=hp["delta"],
        momentum2=hp["momentum2"], rms_decay=hp["rms_decay"])
    ref = [a.copy() for a in init]
    nh = len(init) * opt.histories
    hist = [np.zeros_like(init[i % len(init)]) for i in range(nh)]
    for it in range(12):
        rate = schedule.learning_rate("step", it, base_lr=base_lr, gamma=0.5, stepsize=4)
        grads = [(rng.standard_normal(s) * 3).astype(f32) for s in shapes]
        for p, gr in zip(ts, grads, strict=True):
            p.grad = torch.from_numpy(gr.copy())
        opt.set_rate(rate)
        opt.step()
        caffe_apply_update(kind, ref, grads, hist, lr_mults, decay_mults, rate=rate, it=it, **hp)
        for p, r in zip(ts, ref, strict=True):
            np.testing.assert_allclose(p.detach().numpy(), r, rtol=1e-5, atol=1e-6)
    # the histories are Caffe's history_ blobs in solverstate order
    for i, p in enumerate(ts):
        np.testing.assert_allclose(opt.state[p]["history"].numpy(), hist[i], rtol=1e-5,
                                   atol=1e-7)
        if opt.histories == 2:
            np.testing.assert_allclose(opt.state[p]["update_history"].numpy(),
                                       hist[len(ts) + i], rtol=1e-5, atol=1e-7)


def test_sgd_rate_lives_inside_the_history() -> None:
    """After a rate change Caffe's SGD still moves by the old rate's history (torch's not)."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = optim.SGD([p], lr=1.0, momentum=0.5)
    p.grad = torch.ones(1)
    opt.step()  # h = 1, w = -1
    opt.set_rate(0.0)
    p.grad = torch.ones(1)
    opt.step()  # h = 0.5*1 + 0*1 = 0.5, w = -1.5 (torch.optim.SGD would not move at lr 0)
    assert p.item() == pytest.approx(-1.5)


def test_clip_scales_by_the_global_norm_before_iter_size() -> None:
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = optim.SGD([a, b], lr=1.0, iter_size=2, clip_gradients=1.0)
    a.grad, b.grad = torch.tensor([3.0]), torch.tensor([4.0])  # norm 5 -> scale 0.2
    opt.step()
    assert a.item() == pytest.approx(-0.3) and b.item() == pytest.approx(-0.4)


def test_frozen_parameter_without_grad_is_left_alone() -> None:
    a = torch.nn.Parameter(torch.ones(2))
    b = torch.nn.Parameter(torch.ones(2), requires_grad=False)
    opt = optim.Adam([a, b], lr=0.1, weight_decay=1.0)
    a.grad = torch.ones(2)
    opt.step()
    assert torch.equal(b, torch.ones(2)) and b not in opt.state


def test_unknown_type() -> None:
    with pytest.raises(ValueError, match="unknown solver type 'Adamax'"):
        optim.make_optimizer("Adamax", [torch.nn.Parameter(torch.ones(1))])


# -- lr policies ------------------------------------------------------------------------------
@pytest.mark.parametrize("policy,kw,expect", [
    ("fixed", {}, lambda it: 0.1),
    ("step", {"gamma": 0.1, "stepsize": 3}, lambda it: 0.1 * 0.1 ** (it // 3)),
    ("exp", {"gamma": 0.9}, lambda it: 0.1 * 0.9 ** it),
    ("inv", {"gamma": 1e-2, "power": 0.75}, lambda it: 0.1 * (1 + 1e-2 * it) ** -0.75),
    ("multistep", {"gamma": 0.5, "stepvalue": [2, 5, 6]},
     lambda it: 0.1 * 0.5 ** sum(it >= s for s in (2, 5, 6))),
    ("poly", {"power": 2.0, "max_iter": 10}, lambda it: 0.1 * (1 - it / 10) ** 2),
    ("sigmoid", {"gamma": -0.5, "stepsize": 4},
     lambda it: 0.1 / (1 + math.exp(0.5 * (it - 4)))),
])
def test_lr_policies(policy, kw, expect) -> None:
    for it in range(10):
        got = schedule.learning_rate(policy, it, base_lr=0.1, **kw)
        assert got == pytest.approx(expect(it), rel=1e-6, abs=1e-12), (policy, it)


def test_current_step() -> None:
    assert schedule.current_step("step", 7, stepsize=3) == 2
    assert schedule.current_step("multistep", 5, stepvalue=[2, 5, 6]) == 2
    assert schedule.current_step("inv", 5) == 0


def test_a_trainable_parameter_without_gradient_is_still_decayed() -> None:
    """Caffe's diff of a blob no loss reaches is 0, and weight decay + momentum still apply."""
    p = torch.nn.Parameter(torch.full((2,), 2.0))
    opt = optim.SGD([p], lr=0.5, momentum=0.9, weight_decay=0.1)
    opt.step()  # grad None: h = 0.5 * (0 + 0.1 * 2) = 0.1; w = 1.9
    assert p.detach().tolist() == pytest.approx([1.9, 1.9])
