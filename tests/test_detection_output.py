"""SSD DetectionOutput in the PyTorch export: the golden detections (Caffe), hand-made decode and
NMS cases, a transcription of Caffe's ApplyNMSFast loop, and OpenCV's DetectionOutput."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import surgery  # noqa: E402
from surgery.export import _torch_runtime as rt  # noqa: E402
from surgery.export.torch import save_torch, to_torch, torch_supported_types  # noqa: E402

from .conftest import GOLDEN, import_generated  # noqa: E402

SSD_GOLDENS = ["face_res10", "mobilenet_ssd"]


def _golden(name: str) -> tuple[surgery.Net, dict[str, np.ndarray], dict, Path]:
    d = GOLDEN / name
    meta = json.loads((d / "meta.json").read_text())
    net = surgery.load(d / "net.prototxt", d / meta["weights"])
    return net, dict(np.load(d / "input.npz")), meta, d


def _valid(rows: np.ndarray) -> np.ndarray:
    """Rows with a real detection: Caffe's empty marker has label -1, OpenCV pads with 0s."""
    rows = rows.reshape(-1, 7)
    return rows[(rows[:, 1] >= 0) & ~np.all(rows == 0, axis=1)]


def _match_as_set(got: np.ndarray, want: np.ndarray, rtol: float) -> float:
    """Match rows one to one by image and label, then by the closest [score, box]; every row
    must find a partner within ``rtol * max|want[:, 2:]|``. Returns the worst distance."""
    got, want = _valid(got), _valid(want)
    assert got.shape == want.shape, (got.shape, want.shape)
    scale = max(float(np.max(np.abs(want[:, 2:]))), 1e-30) if len(want) else 1.0
    free = np.ones(len(got), bool)
    worst = 0.0
    for row in want:
        same = free & (got[:, 0] == row[0]) & (got[:, 1] == row[1])
        assert same.any(), f"no row for image {row[0]} label {row[1]}"
        dist = np.where(same, np.max(np.abs(got[:, 2:] - row[2:]), axis=1), np.inf)
        j = int(np.argmin(dist))
        assert dist[j] <= rtol * scale, (row, got[j], dist[j])
        worst = max(worst, float(dist[j]) / scale)
        free[j] = False
    return worst


def _check_caffe_order(rows: np.ndarray) -> None:
    """Caffe's layout: per image, labels ascending, scores descending within a label."""
    rows = _valid(rows)
    key = list(zip(rows[:, 0], rows[:, 1], -rows[:, 2], strict=True))
    assert key == sorted(key)


# -- goldens ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SSD_GOLDENS)
def test_golden_detections_equal_caffe(name: str) -> None:
    net, inputs, meta, d = _golden(name)
    gm = to_torch(net, input_shapes={k: v.shape for k, v in inputs.items()},
                  detection_output=True)
    assert gm.output_names == ["detection_out"]
    with torch.no_grad():
        out = gm(*[torch.from_numpy(inputs[n]) for n in gm.input_names]).numpy()
    gold = np.load(d / "outputs.npz")["detection_out"]
    assert out.shape == gold.shape  # (1, 1, kept, 7): Caffe's count, no padding
    assert out.dtype == np.float32
    worst = _match_as_set(out, gold, float(meta["tolerance"]))
    assert worst <= float(meta["tolerance"])
    _check_caffe_order(out)


def test_default_export_still_cuts_before_detection_output() -> None:
    net, inputs, _, _ = _golden("face_res10")
    gm = to_torch(net, input_shapes={k: v.shape for k, v in inputs.items()})
    assert set(gm.output_names) == {"mbox_loc", "mbox_conf_flatten", "mbox_priorbox"}
    assert "DetectionOutput" not in torch_supported_types()  # opt-in, not a table entry




def test_model_py_with_detection_output(tmp_path: Path) -> None:
    net, inputs, _, d = _golden("mobilenet_ssd")
    shapes = {k: v.shape for k, v in inputs.items()}
    out = save_torch(net, tmp_path / "m", input_shapes=shapes, detection_output=True)
    src = (out / "model.py").read_text()
    assert "caffe_detection_output(" in src and "keep_top_k=100" in src
    mod = import_generated(out / "model.py", "gen_det_mobilenet_ssd")
    model = mod.CaffeNet()
    model.load_weights(str(out / "weights.safetensors"))
    model.eval()
    gm = to_torch(net, input_shapes=shapes, detection_output=True)
    x = torch.from_numpy(inputs["data"])
    with torch.no_grad():
        a, b = gm(x), model(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert mod.OUTPUT_NAMES == ["detection_out"]


# -- decode -----------------------------------------------------------------------------------
PRIOR = [0.1, 0.2, 0.5, 0.6]
VAR = [0.1, 0.1, 0.2, 0.2]
LOC = [1.0, -1.0, 0.5, 2.0]


def _center(cx: float, cy: float, w: float, h: float) -> list[float]:
    return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]


@pytest.mark.parametrize(("code", "in_target", "want"), [
    ("CORNER", False, [0.2, 0.1, 0.6, 1.0]),
    ("CORNER", True, [1.1, -0.8, 1.0, 2.6]),
    ("CENTER_SIZE", False, _center(0.34, 0.36, math.exp(0.1) * 0.4, math.exp(0.4) * 0.4)),
    ("CENTER_SIZE", True, _center(0.7, 0.0, math.exp(0.5) * 0.4, math.exp(2.0) * 0.4)),
    ("CORNER_SIZE", False, [0.14, 0.16, 0.54, 0.76]),
    ("CORNER_SIZE", True, [0.5, -0.2, 0.7, 1.4]),
])
def test_decode_each_code_type(code: str, in_target: bool, want: list[float]) -> None:
    t = torch.tensor
    got = rt.caffe_decode_bboxes(t([LOC]), t([PRIOR]), t([VAR]), code, in_target)
    np.testing.assert_allclose(got[0].numpy(), want, rtol=0, atol=1e-6)
    # The enum number Caffe stores (1, 2, 3) means the same.
    num = {v: k for k, v in rt.CAFFE_CODE_TYPES.items()}[code]
    assert torch.equal(rt.caffe_decode_bboxes(t([LOC]), t([PRIOR]), t([VAR]), num, in_target),
                       got)


def test_decode_needs_variances_unless_encoded_in_target() -> None:
    t = torch.tensor
    with pytest.raises(ValueError, match="variances"):
        rt.caffe_decode_bboxes(t([LOC]), t([PRIOR]), None, "CORNER", False)
    with pytest.raises(ValueError, match="code_type"):
        rt.caffe_decode_bboxes(t([LOC]), t([PRIOR]), t([VAR]), "DIAGONAL", False)


# -- overlap and NMS --------------------------------------------------------------------------
def test_jaccard_overlap_cases() -> None:
    t = torch.tensor
    a = t([0.0, 0.0, 2.0, 2.0])
    cases = {
        (0.0, 0.0, 2.0, 2.0): 1.0,           # identical
        (1.0, 0.0, 3.0, 2.0): 2.0 / 6.0,     # half overlap
        (2.0, 0.0, 4.0, 2.0): 0.0,           # touching edge: zero width
        (5.0, 5.0, 6.0, 6.0): 0.0,           # disjoint
        (1.0, 1.0, 0.5, 3.0): 0.0,           # invalid box (xmax < xmin): size 0, no overlap
    }
    for box, want in cases.items():
        got = float(rt.caffe_jaccard_overlap(a, t(box)))
        assert got == pytest.approx(want, abs=1e-7), box
        assert float(rt.caffe_jaccard_overlap(t(box), a)) == got  # symmetric, bit for bit
    # normalized=False: +1 on the intersection sides, areas stay w * h (Caffe's default), so
    # even disjoint boxes overlap by a 1x1 "pixel".
    assert float(rt.caffe_jaccard_overlap(t([0.0, 0, 1, 1]), t([3.0, 3, 4, 4]), False)) == 1.0
    assert float(rt.caffe_jaccard_overlap(a, t([1.0, 0, 3, 2]), False)) == pytest.approx(6 / 2)
    assert float(rt.caffe_bbox_size(t([0.0, 0, 2, 3]), False)) == 12.0


BOXES = [[0, 0, 1, 1], [0, 0, 1, 0.9], [2, 2, 3, 3], [0.5, 0, 1.5, 1]]
SCORES = [0.9, 0.8, 0.7, 0.95]


def _nms(boxes, scores, score_thr=-math.inf, thr=0.45, eta=1.0, top_k=-1) -> list[int]:
    t = torch.tensor
    return rt.caffe_nms_fast(t(boxes, dtype=torch.float32), t(scores, dtype=torch.float32),
                             score_thr, thr, eta, top_k).tolist()


def test_nms_hand_cases() -> None:
    # D (0.95) first; A overlaps D by 1/3 (kept); B overlaps A by 0.9 (gone); C is apart.
    assert _nms(BOXES, SCORES) == [3, 0, 2]
    assert _nms(BOXES, SCORES, thr=0.3) == [3, 2]  # 1/3 > 0.3 now suppresses A
    assert _nms(BOXES, SCORES, thr=0.95) == [3, 0, 1, 2]
    assert _nms(BOXES, SCORES, score_thr=0.85) == [3, 0]
    assert _nms(BOXES, SCORES, score_thr=0.9) == [3]  # strictly greater, in float32
    assert _nms(BOXES, SCORES, top_k=2) == [3, 0]  # top_k before NMS
    assert _nms(BOXES, SCORES, top_k=0) == []
    assert _nms(BOXES, SCORES, score_thr=1.0) == []


def test_nms_ties_keep_the_earlier_prior() -> None:
    boxes = [[0, 0, 1, 1], [0, 0, 1, 1], [5, 5, 6, 6], [0, 0, 1, 1]]
    assert _nms(boxes, [0.5, 0.7, 0.6, 0.7]) == [1, 2]
    assert _nms(boxes, [0.7, 0.5, 0.6, 0.7]) == [0, 2]


def test_nms_adaptive_eta() -> None:
    # B overlaps A by 0.6/1.4 = 0.43: kept at 0.6, gone once eta = 0.5 halves it to 0.3.
    boxes = [[0, 0, 1, 1], [0.4, 0, 1.4, 1]]
    assert _nms(boxes, [0.9, 0.8], thr=0.6) == [0, 1]
    assert _nms(boxes, [0.9, 0.8], thr=0.6, eta=0.5) == [0]
    # The threshold only shrinks while above 0.5: 0.55 -> 0.495 after A, then stays even
    # after C is kept, so D (overlap 0.49 with A) survives.
    x = 0.51 / 1.49
    boxes = [[0, 0, 1, 1], [5, 5, 6, 6], [x, 0, 1 + x, 1]]
    assert _nms(boxes, [0.9, 0.8, 0.7], thr=0.55, eta=0.9) == [0, 1, 2]
    assert _nms(boxes, [0.9, 0.8, 0.7], thr=0.55, eta=0.8) == [0, 1]


def _caffe_overlap(a: np.ndarray, b: np.ndarray) -> np.float32:
    """JaccardOverlap(NormalizedBBox) transcribed, float32 scalars."""
    f = np.float32
    if b[0] > a[2] or b[2] < a[0] or b[1] > a[3] or b[3] < a[1]:
        inter = [f(0)] * 4
    else:
        inter = [max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])]
    iw, ih = f(inter[2] - inter[0]), f(inter[3] - inter[1])
    if not (iw > 0 and ih > 0):
        return f(0)

    def size(x: np.ndarray) -> np.float32:
        return f(0) if x[2] < x[0] or x[3] < x[1] else f(f(x[2] - x[0]) * f(x[3] - x[1]))

    isz = f(iw * ih)
    return f(isz / f(f(size(a) + size(b)) - isz))


def _caffe_nms(boxes: np.ndarray, scores: np.ndarray, score_thr: float, nms_thr: float,
               eta: float, top_k: int) -> list[int]:
    """ApplyNMSFast + GetMaxScoreIndex transcribed (stable sort, top_k, adaptive eta)."""
    pairs = [(scores[i], i) for i in range(len(scores)) if scores[i] > np.float32(score_thr)]
    pairs.sort(key=lambda p: -p[0])  # stable, as std::stable_sort
    if top_k > -1:
        pairs = pairs[:top_k]
    thr = np.float32(nms_thr)
    kept: list[int] = []
    for _, idx in pairs:
        keep = True
        for k in kept:
            if not _caffe_overlap(boxes[idx], boxes[k]) <= thr:
                keep = False
                break
        if keep:
            kept.append(idx)
        if keep and eta < 1 and thr > 0.5:
            thr = np.float32(thr * np.float32(eta))
    return kept


@pytest.mark.parametrize("seed", range(6))
def test_nms_equals_caffe_loop_on_random_boxes(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 120
    centers = rng.uniform(0.3, 0.7, (n, 2))
    sizes = rng.uniform(0.05, 0.3, (n, 2))
    boxes = np.concatenate([centers - sizes / 2, centers + sizes / 2], 1).astype(np.float32)
    boxes[::17, 2] = boxes[::17, 0] - 0.01  # a few invalid boxes (size 0)
    scores = rng.uniform(0, 1, n).astype(np.float32)
    scores[::9] = scores[4]  # ties
    eta = [1.0, 0.9, 0.7][seed % 3]
    thr = [0.45, 0.7, 0.3][seed % 3]
    top_k = [-1, 50, 200][seed % 3]
    got = rt.caffe_nms_fast(torch.from_numpy(boxes), torch.from_numpy(scores), 0.2, thr, eta,
                            top_k).tolist()
    assert got == _caffe_nms(boxes, scores, 0.2, thr, eta, top_k)
    assert len(got) > 3


# -- the whole layer on small inputs ----------------------------------------------------------
def _priors(p: int, rng: np.random.Generator) -> np.ndarray:
    c = rng.uniform(0.2, 0.8, (p, 2))
    s = rng.uniform(0.1, 0.4, (p, 2))
    boxes = np.concatenate([c - s / 2, c + s / 2], 1).reshape(-1)
    var = np.tile([0.1, 0.1, 0.2, 0.2], p)
    return np.stack([boxes, var])[None].astype(np.float32)


def test_detection_output_keep_top_k_layout_and_empty() -> None:
    rng = np.random.default_rng(0)
    p, c = 30, 4
    prior = torch.from_numpy(_priors(p, rng))
    loc = torch.from_numpy(rng.normal(0, 0.5, (2, p * 4)).astype(np.float32))
    conf = torch.softmax(torch.from_numpy(rng.normal(0, 2, (2, p, c)).astype(np.float32)), -1)
    conf = conf.reshape(2, -1)
    kw = dict(num_classes=c, code_type="CENTER_SIZE", nms_threshold=0.45,
              confidence_threshold=0.05)
    full = rt.caffe_detection_output(loc, conf, prior, **kw)[0, 0].numpy()
    top = rt.caffe_detection_output(loc, conf, prior, keep_top_k=5, **kw)[0, 0].numpy()
    assert full.shape[0] > 10 and top.shape == (10, 7)  # 5 per image, both images
    assert set(full[:, 1]) <= {1.0, 2.0, 3.0}  # never the background
    for rows in (full, top):
        _check_caffe_order(rows)
    for i in (0, 1):  # keep_top_k keeps each image's 5 best scores across classes
        best = np.sort(full[full[:, 0] == i, 2])[::-1][:5]
        np.testing.assert_array_equal(np.sort(top[top[:, 0] == i, 2])[::-1], best)
    # Nothing above the threshold: one row [i, -1 x 6] per image, Caffe's fake result.
    none = rt.caffe_detection_output(loc, conf, prior, num_classes=c, confidence_threshold=1.0)
    np.testing.assert_array_equal(none.numpy(), [[[[0] + [-1] * 6, [1] + [-1] * 6]]])
    # One image without detections among others: it simply has no rows.
    conf2 = conf.clone()
    conf2[1] = 0.0
    rows = rt.caffe_detection_output(loc, conf2, prior, **kw)[0, 0].numpy()
    assert set(rows[:, 0]) == {0.0}


def test_detection_output_per_class_locations() -> None:
    """share_location false: class c uses its own loc slot; background_label_id -1 keeps all."""
    rng = np.random.default_rng(1)
    p, c = 12, 3
    prior = torch.from_numpy(_priors(p, rng))
    loc = torch.from_numpy(rng.normal(0, 0.5, (1, p, c, 4)).astype(np.float32))
    conf = torch.from_numpy(rng.uniform(0, 1, (1, p, c)).astype(np.float32))
    out = rt.caffe_detection_output(loc.reshape(1, -1), conf.reshape(1, -1), prior,
                                    num_classes=c, share_location=False,
                                    background_label_id=-1, code_type="CORNER",
                                    nms_threshold=0.5)[0, 0]
    assert set(out[:, 1].tolist()) == {0.0, 1.0, 2.0}
    pv = prior[0].reshape(2, p, 4)
    for row in out:
        label = int(row[1])
        hits = torch.nonzero(conf[0, :, label] == row[2]).flatten()
        assert len(hits) == 1
        k = int(hits[0])
        want = rt.caffe_decode_bboxes(loc[0, k, label], pv[0, k], pv[1, k], "CORNER", False)
        assert torch.equal(row[3:], want)


# -- OpenCV's DetectionOutput as an independent reference -------------------------------------
DET_NET = """
name: "det"
layer {{ name: "in" type: "Input" top: "loc" top: "conf" top: "prior"
  input_param {{ shape {{ dim: {n} dim: {l} }} shape {{ dim: {n} dim: {cf} }}
                shape {{ dim: 1 dim: 2 dim: {l1} }} }} }}
layer {{ name: "detection_out" type: "DetectionOutput" bottom: "loc" bottom: "conf"
  bottom: "prior" top: "detection_out"
  detection_output_param {{ num_classes: {c} share_location: true background_label_id: 0
    nms_param {{ nms_threshold: 0.45 top_k: 60 }} code_type: {code} keep_top_k: 40
    confidence_threshold: 0.1 }} }}
"""


@pytest.mark.parametrize(("code", "seed"), [("CENTER_SIZE", 0), ("CORNER", 1),
                                             ("CENTER_SIZE", 2)])
def test_matches_opencv_detection_output(tmp_path: Path, code: str, seed: int) -> None:
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(seed)
    n, p, c = 2, 200, 5
    prior = _priors(p, rng)
    loc = rng.normal(0, 0.3 if code == "CORNER" else 0.5, (n, p * 4)).astype(np.float32)
    if code == "CORNER":
        loc *= 0.3
    logits = rng.normal(0, 2, (n, p, c)).astype(np.float32)
    conf = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(np.float32)
    conf = conf.reshape(n, -1)
    path = tmp_path / "det.prototxt"
    path.write_text(DET_NET.format(n=n, l=p * 4, cf=p * c, l1=p * 4, c=c, code=code))
    cvnet = cv2.dnn.readNetFromCaffe(str(path))
    cvnet.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    for name, arr in (("loc", loc), ("conf", conf), ("prior", prior)):
        cvnet.setInput(arr, name)
    want = cvnet.forward("detection_out")
    gm = to_torch(surgery.load(path), detection_output=True)
    assert gm.input_names == ["loc", "conf", "prior"]
    with torch.no_grad():
        got = gm(torch.from_numpy(loc), torch.from_numpy(conf), torch.from_numpy(prior)).numpy()
    assert len(_valid(got)) > 40  # both images, several classes, NMS at work
    assert _match_as_set(got, want, 1e-5) <= 1e-5
