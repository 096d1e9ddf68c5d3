"""surgery.data against the reference Caffe's own data layers.

tests/data/data_golden.npz was recorded once by tools/record_data_golden.py: it built each case
of tests/data_cases.py (tiny LMDB/LevelDB/ImageData/HDF5 datasets, seeded pixels) and ran the
reference Caffe (../shared/tools/build-reference-caffe.sh: BVLC master + fork layers, CPU, with
LMDB/LevelDB/HDF5/OpenCV) on it: ``caffe.Net(net.prototxt, phase)`` then
``net.forward(end="data")`` once per batch. Here the same datasets are rebuilt in tmp_path (the
encoded images from the stored bytes) and read through :func:`surgery.data.loader`: uint8
sources must equal Caffe to the last bit, float sources within 1e-6 relative.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

import surgery.data as sd  # noqa: E402
from tests.data_cases import CASES, Case  # noqa: E402

GOLDEN = Path(__file__).parent / "data" / "data_golden.npz"


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    with np.load(GOLDEN) as z:
        return {k: z[k] for k in z.files}


def _build(case: Case, folder: Path, golden: dict[str, np.ndarray]) -> Path:
    blobs = {k.split("/", 1)[1]: v for k, v in golden.items() if k.startswith("input/")}
    folder.mkdir(parents=True, exist_ok=True)
    case.build(folder, blobs)
    return folder / "net.prototxt"


def _batches(proto: Path, case: Case, **kw: object) -> list[np.ndarray]:
    ld = sd.loader(proto, "data", case.phase, seed=0, **kw)
    got = list(itertools.islice(ld, case.batches))
    return [np.concatenate([b[j].numpy() for b in got]) for j in range(len(case.tops))]


def _compare(ours: np.ndarray, caffe: np.ndarray, exact: bool, what: str) -> None:
    assert ours.dtype == np.float32, what
    assert ours.shape == caffe.shape, what
    if exact:
        bad = np.flatnonzero(ours.ravel() != caffe.ravel())
        assert bad.size == 0, (f"{what}: {bad.size} values differ, first at {bad[0]}: "
                               f"{ours.ravel()[bad[0]]} vs Caffe {caffe.ravel()[bad[0]]}")
    else:
        np.testing.assert_allclose(ours, caffe, rtol=1e-6, atol=0, err_msg=what)


# LevelDB is read by one process only (workers=0; the refusal is tested in test_data.py)
RUNS = [(c, w) for w in (0, 1) for c in CASES if not (w and "leveldb" in c.name)]


@pytest.mark.parametrize("case,workers", RUNS, ids=[f"{c.name}-w{w}" for c, w in RUNS])
def test_tops_equal_reference_caffe(case: Case, workers: int, golden: dict,
                                    tmp_path: Path) -> None:
    """With a worker process the pixels travel as uint8 and the main process finishes the
    transform: the same bits."""
    proto = _build(case, tmp_path / case.name, golden)
    ours = _batches(proto, case, workers=workers)
    for top, got in zip(case.tops, ours, strict=True):
        _compare(got, golden[f"{case.name}/{top}"], case.exact, f"{case.name}/{top}")


def test_paths_resolve_from_the_prototxt_folder(golden: dict, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Caffe ran in the case folder; we run from elsewhere and find the files by the
    prototxt's folder, reporting the file used."""
    case = CASES[0]
    proto = _build(case, tmp_path / "c", golden)
    monkeypatch.chdir(tmp_path)
    ds = sd.dataset(proto, "data", case.phase)
    used = {r.field: r.path for r in ds.resolved}
    assert used["data_param.source"] == tmp_path / "c" / "db"
    assert used["transform_param.mean_file"] == tmp_path / "c" / "mean.binaryproto"
    monkeypatch.chdir(tmp_path / "c")  # the working directory wins, as in Caffe
    assert sd.dataset("net.prototxt", "data", case.phase).resolved[0].path == Path(
        os.getcwd()) / "db"


def test_wraps_past_the_end_as_caffe(golden: dict) -> None:
    """The raw-colour case reads 8 samples from 5 records: Caffe's cursor wrapped."""
    labels = golden["lmdb_raw_color_meanfile_scale_crop/label"]
    assert labels.tolist() == [0, 3, 6, 9, 12, 0, 3, 6]


@pytest.mark.parametrize("world", [2, 3])
def test_round_robin_split_deals_caffe_stream(world: int, golden: dict, tmp_path: Path) -> None:
    """Rank r gets the stream's samples k with k % world == r (BVLC DataLayer::Skip); the
    stream is Caffe's recorded one (the fork's pycaffe cannot run several solvers)."""
    case = CASES[0]
    proto = _build(case, tmp_path / "c", golden)
    caffe = golden[f"{case.name}/data"]
    for rank in range(world):
        ld = sd.loader(proto, "data", "test", batch_size=1, rank=rank, world_size=world)
        got = np.concatenate([b[0].numpy() for b in itertools.islice(ld, 3)])
        want = caffe[rank::world][:3]
        np.testing.assert_array_equal(got[:len(want)], want)
