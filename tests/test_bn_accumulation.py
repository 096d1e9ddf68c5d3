"""BatchNorm's running statistics trained in torch follow Caffe's accumulation (sums over a
factor, ``batch_norm_layer.cpp``), not PyTorch's slow moving average from (0, 1); the factor
goes back to the caffemodel as blob 2."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import surgery  # noqa: E402
from surgery.export.caffemodel import weights_from_torch  # noqa: E402
from surgery.export.torch import to_torch  # noqa: E402

NET = """
layer { name: "in" type: "Input" top: "data" input_param { shape { dim: 4 dim: 3 dim: 6 dim: 6 } } }
layer { name: "bn" type: "BatchNorm" bottom: "data" top: "bn" }
"""


def _caffe_bn_sums(batches: list[np.ndarray], s_m: np.ndarray, s_v: np.ndarray, f: float
                   ) -> tuple[np.ndarray, np.ndarray, np.float32]:
    """Caffe's TRAIN-phase update, float32: S = maf * S + batch, F = maf * F + 1."""
    maf = np.float32(0.999)
    fac = np.float32(f)
    for x in batches:
        n = x.size / x.shape[1]
        mean = x.mean(axis=(0, 2, 3), dtype=np.float64).astype(np.float32)
        var = x.var(axis=(0, 2, 3), dtype=np.float64).astype(np.float32)
        s_m = (maf * s_m + mean).astype(np.float32)
        s_v = (maf * s_v + var * np.float32(n / (n - 1))).astype(np.float32)
        fac = np.float32(fac * maf + np.float32(1))
    return s_m, s_v, fac


@pytest.mark.parametrize("start_factor", [0.0, 999.98])
def test_running_stats_and_factor_follow_caffe(tmp_path, start_factor: float) -> None:
    p = tmp_path / "n.prototxt"
    p.write_text(NET)
    net = surgery.load(p)
    rng = np.random.default_rng(0)
    s_m0 = (rng.normal(size=3) * start_factor).astype(np.float32)
    s_v0 = (rng.uniform(1, 2, size=3) * start_factor).astype(np.float32)
    lay = net.layer("bn")
    lay.params = [surgery.Param(data=s_m0), surgery.Param(data=s_v0),
                  surgery.Param(data=np.array([start_factor], np.float32))]
    model = to_torch(net, missing="fill")
    model.train()
    batches = [rng.normal(3.0, 2.0, (4, 3, 6, 6)).astype(np.float32) for _ in range(4)]
    with torch.no_grad():
        for x in batches:
            model(torch.from_numpy(x))
    s_m, s_v, fac = _caffe_bn_sums(batches, s_m0, s_v0, start_factor)
    bn = next(m for m in model.modules() if type(m).__name__ == "CaffeBatchNorm")
    assert bn.caffe_factor == pytest.approx(float(fac), rel=1e-7)
    # from scratch the first batch's statistics count at once (PyTorch's EMA would give ~0.01)
    np.testing.assert_allclose(bn.running_mean.numpy(), s_m / fac, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.running_var.numpy(), s_v / fac, rtol=1e-5, atol=1e-6)
    back, _ = weights_from_torch(model, net)
    blobs = [p.data for p in back.layer("bn").params]
    assert float(blobs[2][0]) == pytest.approx(float(fac), rel=1e-7)
    np.testing.assert_allclose(blobs[0].reshape(-1), s_m, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(blobs[1].reshape(-1), s_v, rtol=1e-5, atol=1e-5)


def test_eval_does_not_move_the_statistics(tmp_path) -> None:
    p = tmp_path / "n.prototxt"
    p.write_text(NET)
    model = to_torch(surgery.load(p), missing="fill")
    model.eval()
    bn = next(m for m in model.modules() if type(m).__name__ == "CaffeBatchNorm")
    before = (bn.running_mean.clone(), bn.caffe_factor)
    with torch.no_grad():
        model(torch.randn(4, 3, 6, 6))
    assert torch.equal(bn.running_mean, before[0]) and bn.caffe_factor == before[1]
