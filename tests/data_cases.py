"""Tiny Caffe datasets built deterministically, shared by tests/test_data*.py and
tools/record_data_golden.py (which records the reference Caffe's tops for them).

Every case is a folder with ``net.prototxt`` (relative paths, so Caffe runs from the folder) and
the data it reads. Pixels come from seeded numpy generators; encoded images (PNG/JPEG) are
stored as bytes in the golden file and written back verbatim, so a different OpenCV encoder in
CI cannot change the inputs (only decoding, the thing under test, runs here).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from surgery.caffe_io import blob_proto_bytes, datum_bytes


def write_lmdb(path: Path, records: list[tuple[bytes, bytes]]) -> None:
    """An LMDB folder holding ``records`` (key, value)."""
    import lmdb

    env = lmdb.open(str(path), map_size=1 << 26)
    with env.begin(write=True) as txn:
        for k, v in records:
            txn.put(k, v)
    env.close()


def write_leveldb(path: Path, records: list[tuple[bytes, bytes]]) -> None:
    """A LevelDB folder holding ``records`` (key, value)."""
    import plyvel

    db = plyvel.DB(str(path), create_if_missing=True, error_if_exists=True)
    with db.write_batch() as wb:
        for k, v in records:
            wb.put(k, v)
    db.close()


def key(i: int, name: str) -> bytes:
    """``convert_imageset``'s key: ``%08d_<path>``."""
    return f"{i:08d}_{name}".encode()


def pixels(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """Seeded uint8 pixels with some structure (so crops and mirrors show)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, shape, dtype=np.int64)
    ramp = np.indices(shape).sum(axis=0) * 7
    return ((base + ramp) % 256).astype(np.uint8)


def encode(img_hwc: np.ndarray, ext: str) -> bytes:
    """Encode an (H, W[, C]) image with OpenCV (recording time only)."""
    import cv2

    ok, buf = cv2.imencode(ext, img_hwc)
    assert ok
    return buf.tobytes()


DATA_LAYER = """name: "case"
layer {{
  name: "data" type: "{type}" top: "data" top: "label"
  include {{ phase: {phase} }}
  transform_param {{ {transform} }}
  {param} {{ {source} }}
}}
layer {{ name: "flat" type: "Flatten" bottom: "data" top: "flat" }}
"""


@dataclass
class Case:
    """One dataset + net; ``build(folder, blobs)`` writes it (``blobs``: stored bytes)."""

    name: str
    phase: str
    batches: int
    build: Callable[[Path, dict[str, np.ndarray]], None]
    tops: list[str] = field(default_factory=lambda: ["data", "label"])
    encoded: dict[str, Callable[[], bytes]] = field(default_factory=dict)
    exact: bool = True  # uint8 source: equal to the bit; else 1e-6 relative


def _net(folder: Path, *, type: str = "Data", phase: str = "TEST", transform: str = "",
         param: str = "data_param", source: str) -> None:
    (folder / "net.prototxt").write_text(DATA_LAYER.format(
        type=type, phase=phase, transform=transform, param=param, source=source))


# -- the cases ------------------------------------------------------------------------------
def _raw_color(folder: Path, blobs: dict) -> None:
    imgs = [pixels(10 + i, (3, 12, 10)) for i in range(5)]
    write_lmdb(folder / "db", [(key(i, f"im{i}.png"), datum_bytes(im, label=i * 3))
                               for i, im in enumerate(imgs)])
    mean = pixels(99, (3, 12, 10)).astype(np.float32) * np.float32(0.37)
    (folder / "mean.binaryproto").write_bytes(blob_proto_bytes(mean))
    _net(folder, transform='mean_file: "mean.binaryproto" scale: 0.00390625 crop_size: 7',
         source='source: "db" backend: LMDB batch_size: 2')


def _raw_gray_train(folder: Path, blobs: dict) -> None:
    imgs = [pixels(20 + i, (1, 9, 7)) for i in range(4)]
    write_lmdb(folder / "db", [(key(i, f"g{i}.png"), datum_bytes(im, label=i))
                               for i, im in enumerate(imgs)])
    _net(folder, phase="TRAIN", transform="mean_value: 127.5 scale: 0.017",
         source='source: "db" backend: LMDB batch_size: 3')


def _float_data(folder: Path, blobs: dict) -> None:
    rng = np.random.default_rng(30)
    recs = [(key(i, f"f{i}"), datum_bytes(float_data=rng.normal(size=(2, 4, 5)) * 50,
                                          label=7 - i)) for i in range(3)]
    write_lmdb(folder / "db", recs)
    _net(folder, transform="mean_value: 1.5 mean_value: -2.25 scale: 0.3",
         source='source: "db" backend: LMDB batch_size: 2')


def _encoded_png(folder: Path, blobs: dict) -> None:
    recs = [(key(i, f"e{i}.png"), blobs[f"png{i}"].tobytes(), ) for i in range(4)]
    write_lmdb(folder / "db", [(k, datum_bytes(b, label=i, encoded=True))
                               for i, (k, b) in enumerate(recs)])
    _net(folder, transform="mean_value: 104 mean_value: 117 mean_value: 123 crop_size: 8",
         source='source: "db" backend: LMDB batch_size: 3')


def _encoded_jpeg_gray(folder: Path, blobs: dict) -> None:
    write_lmdb(folder / "db", [(key(i, f"j{i}.jpg"),
                                datum_bytes(blobs[f"jpg{i}"].tobytes(), label=i, encoded=True))
                               for i in range(3)])
    _net(folder, transform="force_gray: true scale: 0.5",
         source='source: "db" backend: LMDB batch_size: 2')


def _encoded_jpeg_mean_file(folder: Path, blobs: dict) -> None:
    write_lmdb(folder / "db", [(key(i, f"j{i}.jpg"),
                                datum_bytes(blobs[f"jpg{i}"].tobytes(), label=i, encoded=True))
                               for i in range(3)])
    mean = pixels(98, (3, 11, 13)).astype(np.float32) * np.float32(0.5)
    (folder / "mean.binaryproto").write_bytes(blob_proto_bytes(mean))
    _net(folder, transform='mean_file: "mean.binaryproto"',
         source='source: "db" backend: LMDB batch_size: 2')


def _encoded_gray_png(force_color: bool) -> Callable[[Path, dict], None]:
    def build(folder: Path, blobs: dict) -> None:
        write_lmdb(folder / "db", [(key(i, f"g{i}.png"),
                                    datum_bytes(blobs[f"gpng{i}"].tobytes(), label=i,
                                                encoded=True)) for i in range(2)])
        _net(folder, transform="force_color: true crop_size: 5" if force_color
             else "mean_value: 33 crop_size: 5",
             source='source: "db" backend: LMDB batch_size: 2')
    return build


def _leveldb(folder: Path, blobs: dict) -> None:
    imgs = [pixels(40 + i, (3, 6, 6)) for i in range(3)]
    write_leveldb(folder / "db", [(key(i, f"l{i}"), datum_bytes(im, label=i))
                                  for i, im in enumerate(imgs)])
    _net(folder, transform="mean_value: 50 crop_size: 4",
         source='source: "db" backend: LEVELDB batch_size: 2')


def _image_data(folder: Path, blobs: dict) -> None:
    (folder / "imgs" / "sub dir").mkdir(parents=True)
    names = ["a 1.png", "sub dir/b.jpg", "c.png", "sub dir/d d.png"]
    keys = ["png0", "jpg1", "png2", "png3"]
    for name, k in zip(names, keys, strict=True):
        (folder / "imgs" / name).write_bytes(blobs[k].tobytes())
    (folder / "list.txt").write_text("".join(f"{n} {i * 2 + 1}\n" for i, n in enumerate(names)))
    _net(folder, type="ImageData", param="image_data_param",
         transform="mean_value: 100 scale: 0.25 crop_size: 9",
         source='source: "list.txt" root_folder: "imgs/" new_height: 11 new_width: 14 '
                'batch_size: 3')


def _image_data_gray(folder: Path, blobs: dict) -> None:
    (folder / "imgs").mkdir()
    for i in range(3):
        (folder / "imgs" / f"x{i}.png").write_bytes(blobs[f"png{i}"].tobytes())
    (folder / "list.txt").write_text("".join(f"imgs/x{i}.png {i}\n" for i in range(3)))
    _net(folder, type="ImageData", param="image_data_param", phase="TRAIN",
         transform="scale: 2",
         source='source: "list.txt" is_color: false new_height: 5 new_width: 6 batch_size: 2')


def _hdf5(folder: Path, blobs: dict) -> None:
    import h5py

    rng = np.random.default_rng(50)
    names = []
    for f, rows in enumerate((3, 2)):
        name = f"part{f}.h5"
        with h5py.File(folder / name, "w") as h:
            h["data"] = rng.normal(size=(rows, 2, 3, 4))  # float64, as h5py writes by default
            h["label"] = rng.integers(0, 5, rows).astype(np.float32)
        names.append(name)
    (folder / "list.txt").write_text("\n".join(names) + "\n")
    (folder / "net.prototxt").write_text("""name: "case"
layer {
  name: "data" type: "HDF5Data" top: "data" top: "label"
  include { phase: TEST }
  hdf5_data_param { source: "list.txt" batch_size: 2 }
}
layer { name: "flat" type: "Flatten" bottom: "data" top: "flat" }
""")


def _encoders() -> dict[str, Callable[[], bytes]]:
    enc: dict[str, Callable[[], bytes]] = {}
    for i in range(4):
        h, w = (13 + i, 11 + 2 * i) if i % 2 else (11 + i, 14)
        enc[f"png{i}"] = (lambda h=h, w=w, i=i:
                          encode(pixels(60 + i, (h, w, 3)), ".png"))
    for i in range(3):
        enc[f"jpg{i}"] = (lambda i=i: encode(pixels(70 + i, (11, 13, 3)), ".jpg"))
    for i in range(2):
        enc[f"gpng{i}"] = (lambda i=i: encode(pixels(80 + i, (7, 9)), ".png"))
    return enc


ENCODERS = _encoders()

CASES = [
    Case("lmdb_raw_color_meanfile_scale_crop", "TEST", 4, _raw_color),
    Case("lmdb_raw_gray_meanvalue_train", "TRAIN", 3, _raw_gray_train),
    Case("lmdb_float_data", "TEST", 2, _float_data, exact=False),
    Case("lmdb_encoded_png_color_crop", "TEST", 2, _encoded_png),
    Case("lmdb_encoded_jpeg_force_gray", "TEST", 2, _encoded_jpeg_gray),
    Case("lmdb_encoded_jpeg_mean_file", "TEST", 2, _encoded_jpeg_mean_file),
    Case("lmdb_encoded_gray_png_native", "TEST", 2, _encoded_gray_png(False)),
    Case("lmdb_encoded_gray_png_force_color", "TEST", 2, _encoded_gray_png(True)),
    Case("leveldb_raw", "TEST", 2, _leveldb),
    Case("image_data_resize_spaces", "TEST", 2, _image_data),
    Case("image_data_gray_train", "TRAIN", 2, _image_data_gray),
    Case("hdf5_two_tops", "TEST", 4, _hdf5, exact=False),
]
