"""surgery.data: the transform against a line-by-line port of Caffe's loop, TRAIN-time random
crop/mirror statistics, Caffe's order (wrap, shuffle, rand_skip, split), bad inputs, and the
``surgery mean`` / ``surgery data`` verbs. Values against the real Caffe: test_data_caffe.py."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

import surgery.data as sd  # noqa: E402
from surgery.caffe_io import blob_proto_bytes, datum_bytes  # noqa: E402
from surgery.cli import main  # noqa: E402
from surgery.data.transform import Transformer, TransformParam  # noqa: E402
from surgery.errors import DataError, LayerNotFoundError  # noqa: E402
from tests.data_cases import encode, key, pixels, write_leveldb, write_lmdb  # noqa: E402

NET = """name: "t"
layer {{
  name: "data" type: "Data" top: "data" top: "label"
  include {{ phase: {phase} }}
  transform_param {{ {transform} }}
  data_param {{ source: "{source}" backend: {backend} batch_size: {batch} {extra} }}
}}
layer {{ name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param {{ num_output: 2 }} }}
"""


def data_net(folder: Path, *, phase: str = "TEST", transform: str = "", source: str = "db",
             backend: str = "LMDB", batch: int = 2, extra: str = "") -> Path:
    p = folder / "net.prototxt"
    p.write_text(NET.format(phase=phase, transform=transform, source=source, backend=backend,
                            batch=batch, extra=extra))
    return p


def lmdb_of(folder: Path, images: list[np.ndarray], labels: list[int] | None = None) -> Path:
    labels = list(range(len(images))) if labels is None else labels
    write_lmdb(folder / "db", [(key(i, f"im{i}"), datum_bytes(im, label=lab))
                               for i, (im, lab) in enumerate(zip(images, labels, strict=True))])
    return folder / "db"


# -- the transform ------------------------------------------------------------------------------
def caffe_loop(x: np.ndarray, p: TransformParam, mean: np.ndarray | None, mirror: bool,
               h_off: int, w_off: int) -> np.ndarray:
    """DataTransformer::Transform(const Datum&, Dtype*) of BVLC, element by element."""
    c_n, dh, dw = x.shape
    h_n = w_n = p.crop_size or 0
    if not p.crop_size:
        h_n, w_n = dh, dw
    out = np.zeros((c_n, h_n, w_n), np.float32)
    mv = list(p.mean_value) * (c_n if len(p.mean_value) == 1 else 1)
    scale = np.float32(p.scale)
    for c in range(c_n):
        for h in range(h_n):
            for w in range(w_n):
                e = np.float32(x[c, h_off + h, w_off + w])
                tw = w_n - 1 - w if mirror else w
                if mean is not None:
                    v = (e - np.float32(mean[c, h_off + h, w_off + w])) * scale
                elif mv:
                    v = (e - np.float32(mv[c])) * scale
                else:
                    v = e * scale
                out[c, h, tw] = v
    return out


@pytest.mark.parametrize("mirror", [False, True])
@pytest.mark.parametrize("mean_kind", ["file", "one", "per_channel", "none"])
@pytest.mark.parametrize("crop", [0, 5])
def test_transform_equals_caffes_loop(mirror: bool, mean_kind: str, crop: int) -> None:
    x = pixels(1, (3, 9, 8))
    mean = pixels(2, (3, 9, 8)).astype(np.float32) * np.float32(0.3) if mean_kind == "file" \
        else None
    mv = {"one": (104.5,), "per_channel": (10.0, 20.25, 30.5)}.get(mean_kind, ())
    p = TransformParam(scale=0.0123, mirror=mirror, crop_size=crop,
                       mean_file="m" if mean is not None else None, mean_value=mv)
    t = Transformer(p, "TRAIN", mean=mean)
    offsets = [(0, 0), (4, 3), (2, 1)] if crop else [(0, 0)]
    for h_off, w_off in offsets:
        ours = t.apply(x, mirror, h_off, w_off)
        want = caffe_loop(x, p, mean, mirror, h_off, w_off)
        assert ours.dtype == np.float32
        np.testing.assert_array_equal(ours, want)


def test_test_phase_crop_is_centred_with_caffes_rounding() -> None:
    t = Transformer(TransformParam(crop_size=4), "TEST")
    assert t.draw((1, 9, 8), None) == (False, 2, 2)  # (9-4)//2, (8-4)//2
    assert t.draw((1, 4, 7), None) == (False, 0, 1)


def test_float_data_is_transformed_in_float32() -> None:
    x = np.random.default_rng(0).normal(size=(2, 3, 4)).astype(np.float32) * 100
    p = TransformParam(scale=0.1, mean_value=(1.5, -2.0))
    np.testing.assert_array_equal(Transformer(p, "TEST")(x), caffe_loop(x, p, None, False, 0, 0))


# -- TRAIN-time random crop and mirror ---------------------------------------------------------
def _position_image(h: int, w: int) -> np.ndarray:
    """Pixel (h, w) holds h * 16 + w, so a crop tells its offset and direction."""
    return (np.arange(h)[:, None] * 16 + np.arange(w)[None, :]).astype(np.uint8)[None]


def test_train_crop_and_mirror_statistics(tmp_path: Path) -> None:
    lmdb_of(tmp_path, [_position_image(10, 12)])
    proto = data_net(tmp_path, phase="TRAIN", transform="crop_size: 7 mirror: true",
                     batch=100)
    ld = sd.loader(proto, "data", "train", seed=5)
    data = np.concatenate([b[0].numpy() for b in itertools.islice(ld, 30)])[:, 0]
    mirrored = data[:, 0, 0] > data[:, 0, 1]
    left = np.where(mirrored, data[:, 0, -1], data[:, 0, 0]).astype(int)
    h_offs, w_offs = left // 16, left % 16
    assert set(h_offs) == set(range(10 - 7 + 1))  # every offset Caffe can draw, none other
    assert set(w_offs) == set(range(12 - 7 + 1))
    assert 0.45 < mirrored.mean() < 0.55  # 3000 draws: 0.5 +- 4.5 sigma
    counts = np.bincount(h_offs)
    assert counts.min() > 3000 / 4 * 0.8  # roughly uniform
    # the same seed gives the same samples, whatever the workers; another seed does not
    again = sd.loader(proto, "data", "train", seed=5, workers=2)
    first = next(iter(again))[0].numpy()[:, 0]
    np.testing.assert_array_equal(first, data[:100])
    other = next(iter(sd.loader(proto, "data", "train", seed=6)))[0].numpy()[:, 0]
    assert not np.array_equal(other, data[:100])
    # a dataset that went through a loader still gives plain float items when indexed
    from surgery.data.loaders import make_loader

    ds = sd.dataset(proto, "data", "train", seed=1)
    next(iter(make_loader(ds, workers=1)))
    assert ds[0][0].dtype == np.float32 and ds[0][0].shape == (1, 7, 7)


def test_test_phase_is_deterministic_without_mirror(tmp_path: Path) -> None:
    lmdb_of(tmp_path, [_position_image(10, 12)])
    proto = data_net(tmp_path, transform="crop_size: 7")
    a = next(iter(sd.loader(proto, "data", "test", seed=1)))[0]
    b = next(iter(sd.loader(proto, "data", "test", seed=2)))[0]
    assert a.equal(b)
    assert int(a[0, 0, 0, 0]) == 1 * 16 + 2  # centre offset (1, 2)


def test_mirror_applies_in_test_too_as_caffe(tmp_path: Path) -> None:
    """BVLC's DataTransformer draws ``mirror && Rand(2)`` whatever the phase: the reference
    Caffe mirrored 23 of 50 samples of a TEST Data layer with ``mirror: true`` (measured when
    writing this test). The crop offset stays centred in TEST."""
    lmdb_of(tmp_path, [_position_image(4, 6)])
    proto = data_net(tmp_path, transform="mirror: true crop_size: 4", batch=200)
    data = next(iter(sd.loader(proto, "data", "test", seed=0)))[0].numpy()[:, 0]
    mirrored = data[:, 0, 0] > data[:, 0, 1]
    assert 0.4 < mirrored.mean() < 0.6
    assert set(data[:, 0, 0].astype(int).tolist()) == {1, 4}  # offset (0, 1), either way


# -- order: wrap, rand_skip, split, shuffle ------------------------------------------------------
def test_wrap_skip_and_split(tmp_path: Path) -> None:
    lmdb_of(tmp_path, [pixels(i, (1, 2, 2)) for i in range(5)], labels=[10, 11, 12, 13, 14])
    proto = data_net(tmp_path, batch=3)
    labels = [b[1].tolist() for b in itertools.islice(sd.loader(proto, "data", "test"), 3)]
    assert labels == [[10, 11, 12], [13, 14, 10], [11, 12, 13]]
    r0 = next(iter(sd.loader(proto, "data", "test", batch_size=5, rank=0, world_size=2)))
    r1 = next(iter(sd.loader(proto, "data", "test", batch_size=5, rank=1, world_size=2)))
    assert r0[1].tolist() == [10, 12, 14, 11, 13] and r1[1].tolist() == [11, 13, 10, 12, 14]
    skip = data_net(tmp_path, batch=5, extra="rand_skip: 4")
    starts = {next(iter(sd.loader(skip, "data", "test", seed=s)))[1].tolist()[0]
              for s in range(40)}
    assert starts == {10, 11, 12, 13}  # a seeded skip in 0..rand_skip-1
    ld = sd.loader(proto, "data", "test", batch_size=2, world_size=2)
    assert ld.batches_per_pass == 2 and ld.tops == ["data", "label"]
    with pytest.raises(TypeError, match="endless"):
        len(ld)


def _image_list(folder: Path, n: int) -> Path:
    (folder / "im").mkdir()
    for i in range(n):
        (folder / "im" / f"{i}.png").write_bytes(encode(pixels(i, (4, 5, 3)), ".png"))
    (folder / "list.txt").write_text("".join(f"im/{i}.png {i}\n" for i in range(n)))
    p = folder / "net.prototxt"
    p.write_text("""layer { name: "data" type: "ImageData" top: "data" top: "label"
  image_data_param { source: "list.txt" batch_size: 7 shuffle: true } }""")
    return p


def test_image_data_shuffles_every_pass_with_a_seed(tmp_path: Path) -> None:
    proto = _image_list(tmp_path, 7)
    passes = [b[1].tolist() for b in itertools.islice(sd.loader(proto, "data", "train",
                                                                seed=3), 3)]
    assert all(sorted(p) == list(range(7)) for p in passes)  # each pass: every image once
    assert len({tuple(p) for p in passes}) == 3
    again = [b[1].tolist() for b in itertools.islice(sd.loader(proto, "data", "train",
                                                               seed=3), 3)]
    assert again == passes


def test_hdf5_shuffle_and_row_order(tmp_path: Path) -> None:
    import h5py

    for f, rows in enumerate((3, 4)):
        with h5py.File(tmp_path / f"{f}.h5", "w") as h:
            h["x"] = np.arange(rows * 2, dtype=np.float64).reshape(rows, 2) + 100 * f
            h["y"] = np.arange(rows) + 10 * f
    (tmp_path / "list.txt").write_text("0.h5 1.h5")
    proto = tmp_path / "net.prototxt"
    proto.write_text("""layer { name: "h" type: "HDF5Data" top: "y" top: "x"
  hdf5_data_param { source: "list.txt" batch_size: 7 } }""")
    y, x = next(iter(sd.loader(proto, "h", "test")))
    assert y.tolist() == [0, 1, 2, 10, 11, 12, 13]
    assert x.numpy().dtype == y.numpy().dtype == np.float32
    assert x[4].tolist() == [102, 103]
    proto.write_text(proto.read_text().replace("batch_size: 7", "batch_size: 7 shuffle: true"))
    passes = [b[0].tolist() for b in itertools.islice(sd.loader(proto, "h", "test", seed=1), 4)]
    assert all(sorted(p) == [0, 1, 2, 10, 11, 12, 13] for p in passes)
    assert len({tuple(p) for p in passes}) > 1


def test_leveldb(tmp_path: Path) -> None:
    write_leveldb(tmp_path / "db", [(key(i, "x"), datum_bytes(pixels(i, (3, 4, 4)), label=i))
                                    for i in range(3)])
    proto = data_net(tmp_path, backend="LEVELDB")
    ds = sd.dataset(proto, "data", "test")
    assert len(ds) == 3 and ds[2][0].tolist() == pixels(2, (3, 4, 4)).astype(np.float32).tolist()
    with pytest.raises(DataError, match="one process at a time"):
        sd.loader(proto, "data", "test", workers=2)


def test_leveldb_without_plyvel_says_how_to_get_it(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    write_leveldb(tmp_path / "db", [(b"k", datum_bytes(pixels(0, (1, 2, 2))))])
    monkeypatch.setitem(sys.modules, "plyvel", None)  # import plyvel -> ImportError
    with pytest.raises(DataError, match=r"needs the optional package plyvel \(pip install"):
        sd.dataset(data_net(tmp_path, backend="LEVELDB"), "data", "test")


# -- bad inputs: one clear error naming the file and the item -----------------------------------
def test_missing_database(tmp_path: Path) -> None:
    proto = data_net(tmp_path, source="nowhere")
    with pytest.raises(DataError, match=r"data_param.source 'nowhere' not found.*nowhere") as e:
        sd.dataset(proto, "data", "test")
    assert "run from the folder it is relative to" in str(e.value)  # the fix, not only where


def test_wrong_backend_says_which(tmp_path: Path) -> None:
    lmdb_of(tmp_path, [pixels(0, (1, 2, 2))])
    with pytest.raises(DataError, match="is an LMDB database but data_param.backend is LEVELDB"):
        sd.dataset(data_net(tmp_path, backend="LEVELDB"), "data", "test")
    write_leveldb(tmp_path / "ldb", [(b"k", datum_bytes(pixels(0, (1, 2, 2))))])
    with pytest.raises(DataError, match="is a LevelDB database but data_param.backend is LMDB"):
        sd.dataset(data_net(tmp_path, source="ldb"), "data", "test")


def test_datasets_pickle_for_spawned_workers(tmp_path: Path) -> None:
    """A spawned worker (macOS, Windows) gets the dataset pickled: no open handles travel,
    and the copy reads the same items."""
    import pickle

    lmdb_of(tmp_path, [pixels(i, (3, 6, 6)) for i in range(3)])
    ds = sd.dataset(data_net(tmp_path, transform="crop_size: 4 mean_value: 3"), "data", "test")
    first = ds[2]
    copy = pickle.loads(pickle.dumps(ds))
    assert all(np.array_equal(a, b) for a, b in zip(first, copy[2], strict=True))
    (tmp_path / "il").mkdir()
    proto = _image_list(tmp_path / "il", 2)
    ds = sd.dataset(proto, "data", "test")
    ds[0]
    assert np.array_equal(pickle.loads(pickle.dumps(ds))[1][0], ds[1][0])


def test_empty_database_and_list(tmp_path: Path) -> None:
    write_lmdb(tmp_path / "db", [])
    with pytest.raises(DataError, match="is empty"):
        sd.dataset(data_net(tmp_path), "data", "test")
    proto = _image_list(tmp_path, 1)
    (tmp_path / "list.txt").write_text("")
    with pytest.raises(DataError, match=r"list file .*list.txt is empty"):
        sd.dataset(proto, "data", "test")


def test_malformed_list_line(tmp_path: Path) -> None:
    proto = _image_list(tmp_path, 2)
    (tmp_path / "list.txt").write_text("im/0.png 0\nim/1.png\n")
    with pytest.raises(DataError, match=r"list.txt:2: expected 'PATH LABEL'"):
        sd.dataset(proto, "data", "test")


@pytest.mark.parametrize("workers", [0, 2])
def test_undecodable_image_names_its_line(tmp_path: Path, workers: int) -> None:
    proto = _image_list(tmp_path, 4)
    (tmp_path / "im" / "2.png").write_bytes(b"not an image")
    (tmp_path / "im" / "3.png").unlink()
    proto.write_text(proto.read_text().replace("shuffle: true", "shuffle: false"))
    ld = sd.loader(proto, "data", "test", batch_size=1, workers=workers)
    it = iter(ld)
    next(it), next(it)
    with pytest.raises(DataError, match=r"list.txt:3 \(.*2.png\): cannot decode the image") \
            as e:
        next(it)
    assert "\n" not in str(e.value)  # one line, not a worker traceback
    with pytest.raises(DataError, match=r"list.txt:4 .*image not found"):
        sd.dataset(proto, "data", "test")[3]


def test_datum_size_mismatch_names_the_key(tmp_path: Path) -> None:
    bad = datum_bytes(bytes(10), shape=(3, 2, 2), label=0)
    write_lmdb(tmp_path / "db", [(b"00000000_a", datum_bytes(pixels(0, (3, 2, 2)))),
                                 (b"00000001_b", bad)])
    ds = sd.dataset(data_net(tmp_path), "data", "test")
    ds[0]
    with pytest.raises(DataError, match=r"key '00000001_b'.*10 bytes but .* 3x2x2 = 12"):
        ds[1]


def test_undecodable_encoded_datum(tmp_path: Path) -> None:
    write_lmdb(tmp_path / "db", [(b"k1", datum_bytes(b"\xff\xd8garbage", encoded=True))])
    with pytest.raises(DataError, match=r"key 'k1'.*cannot decode"):
        sd.dataset(data_net(tmp_path), "data", "test")[0]


def test_crop_larger_than_image(tmp_path: Path) -> None:
    lmdb_of(tmp_path, [pixels(0, (3, 5, 6))])
    ds = sd.dataset(data_net(tmp_path, transform="crop_size: 6"), "data", "test")
    with pytest.raises(DataError, match=r"crop_size 6 is larger than the image \(5x6\)"):
        ds[0]


def test_mean_shape_mismatch(tmp_path: Path) -> None:
    lmdb_of(tmp_path, [pixels(0, (3, 5, 6))])
    (tmp_path / "mean.binaryproto").write_bytes(blob_proto_bytes(np.zeros((3, 5, 5))))
    ds = sd.dataset(data_net(tmp_path, transform='mean_file: "mean.binaryproto"'), "data",
                    "test")
    with pytest.raises(DataError, match=r"mean_file 'mean.binaryproto' has shape \(3, 5, 5\) "
                                        r"but the data is \(3, 5, 6\)"):
        ds[0]


def test_layer_lookup_errors(tmp_path: Path) -> None:
    lmdb_of(tmp_path, [pixels(0, (1, 2, 2))])
    proto = data_net(tmp_path, phase="TRAIN")
    with pytest.raises(DataError, match="not in the TEST net"):
        sd.dataset(proto, "data", "test")
    with pytest.raises(LayerNotFoundError, match="did you mean 'data'"):
        sd.dataset(proto, "dat", "train")
    inp = tmp_path / "input.prototxt"
    inp.write_text('layer { name: "in" type: "Input" top: "x" '
                   'input_param { shape { dim: 1 dim: 3 } } }')
    with pytest.raises(DataError, match=r"feed its tops \(x 1x3\) yourself"):
        sd.dataset(inp, "in", "test")


def test_stage_rules_and_a_single_top(tmp_path: Path) -> None:
    """A solver's test_state (stages) picks the layer; a Data layer with one top gives
    1-tuples (Caffe's output_labels_ is false)."""
    from surgery.net import NetState

    lmdb_of(tmp_path, [pixels(i, (1, 2, 2)) for i in range(3)])
    proto = tmp_path / "net.prototxt"
    proto.write_text("""layer { name: "data" type: "Data" top: "data"
  include { phase: TEST stage: "val" }
  data_param { source: "db" backend: LMDB batch_size: 2 } }""")
    with pytest.raises(DataError, match="stages"):
        sd.dataset(proto, "data", "test")
    ds = sd.dataset(proto, "data", NetState("TEST", stages=("val",)))
    assert ds.tops == ["data"] and len(ds[1]) == 1
    batch = next(iter(sd.loader(proto, "data", NetState("TEST", stages=("val",)))))
    assert len(batch) == 1 and tuple(batch[0].shape) == (2, 1, 2, 2)


def test_image_data_rand_skip(tmp_path: Path) -> None:
    proto = _image_list(tmp_path, 5)
    proto.write_text(proto.read_text().replace("shuffle: true", "rand_skip: 3"))
    starts = {next(iter(sd.loader(proto, "data", "test", seed=s)))[1].tolist()[0]
              for s in range(30)}
    assert starts == {0, 1, 2}


def test_hdf5_missing_dataset(tmp_path: Path) -> None:
    import h5py

    with h5py.File(tmp_path / "a.h5", "w") as h:
        h["data"] = np.zeros((2, 3))
    (tmp_path / "list.txt").write_text("a.h5\n")
    proto = tmp_path / "net.prototxt"
    proto.write_text("""layer { name: "h" type: "HDF5Data" top: "data" top: "label"
  hdf5_data_param { source: "list.txt" batch_size: 2 } }""")
    with pytest.raises(DataError, match=r"a.h5: no dataset 'label'"):
        sd.dataset(proto, "h", "test")


# -- CLI ---------------------------------------------------------------------------------------
def test_cli_mean_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    mean = pixels(3, (3, 4, 5)).astype(np.float32) / 3
    src = tmp_path / "mean.binaryproto"
    src.write_bytes(blob_proto_bytes(mean))
    assert main(["mean", str(src), "-o", str(tmp_path / "m.npy")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "m.npy"), mean)
    assert main(["mean", str(tmp_path / "m.npy"), "-o", str(tmp_path / "b.binaryproto"),
                 "--json"]) == 0
    assert (tmp_path / "b.binaryproto").read_bytes() == src.read_bytes()
    rep = json.loads(capsys.readouterr().out.split("\n", 2)[-1])
    assert rep["shape"] == [3, 4, 5]
    assert main(["mean", str(src), "-o", str(src)]) == 2  # never overwrites its input
    (tmp_path / "bad.binaryproto").write_bytes(b"\x08\x01")
    assert main(["mean", str(tmp_path / "bad.binaryproto")]) == 2
    assert "holds no data" in capsys.readouterr().err


def test_cli_data_report_and_dump(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    lmdb_of(tmp_path, [pixels(i, (3, 6, 6)) for i in range(4)], labels=[1, 1, 2, 5])
    proto = data_net(tmp_path, transform="mean_value: 10 scale: 0.5 crop_size: 4")
    out = tmp_path / "dump"
    assert main(["data", str(proto), "--layer", "data", "--phase", "test", "--count", "4",
                 "--dump", str(out), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    data, label = rep["tops"]
    assert data["shape"] == [3, 4, 4] and data["dtype"] == "float32"
    assert label["histogram"] == {"1": 2, "2": 1, "5": 1}
    assert rep["samples"] == 4 and rep["samples_per_s"] > 0
    assert sorted(p.name for p in out.iterdir())[:3] == ["0000_data.npy", "0000_data.png",
                                                         "0000_label.npy"]
    import cv2

    png = cv2.imread(str(out / "0001_data.png"))  # the centre crop, mean and scale undone
    np.testing.assert_array_equal(png.transpose(2, 0, 1), pixels(1, (3, 6, 6))[:, 1:5, 1:5])
    assert main(["data", str(proto), "--layer", "data", "--phase", "train"]) == 2
    assert "not in the TRAIN net" in capsys.readouterr().err


def test_mean_verb_imports_no_torch_cv2_or_lmdb(tmp_path: Path) -> None:
    src = tmp_path / "m.binaryproto"
    src.write_bytes(blob_proto_bytes(np.ones((1, 2, 2))))
    code = (
        "import sys; from surgery.cli import main; "
        f"rc = main(['mean', {str(src)!r}, '-o', {str(tmp_path / 'm.npy')!r}]); "
        "bad = [m for m in ('torch', 'cv2', 'lmdb', 'h5py') if m in sys.modules]; "
        "sys.exit(rc or (1 if bad else 0))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
