"""``Data`` layer sources: LMDB and LevelDB databases of ``Datum`` records.

As Caffe's ``DataLayer`` (``db_lmdb.cpp``, ``db_leveldb.cpp``): records come in the database's
key order (bytewise, as both databases sort), each value one serialized ``Datum``:

- raw: ``channels x height x width`` uint8 ``data`` or ``float_data``, in (C, H, W) order;
- encoded (``encoded: true``, ``convert_imageset --encoded``): image file bytes decoded with
  OpenCV's ``imdecode`` -- as stored (``IMREAD_UNCHANGED``) unless ``force_color``
  (``IMREAD_COLOR``) or ``force_gray`` (``IMREAD_GRAYSCALE``) -- then HWC -> CHW, BGR as
  OpenCV gives it.

The keys are listed once when the source is opened (random access by index); the database is
opened again in each process that reads (LMDB read-only without locks, so many DataLoader workers
can share it; LevelDB allows one process at a time).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import DataError
from .source import Source

__all__ = ["DatumSource", "decode_datum"]


def decode_datum(raw: bytes, *, force_color: bool = False, force_gray: bool = False,
                 item: str = "record") -> tuple[np.ndarray, int]:
    """One serialized ``Datum`` -> ((C, H, W) uint8 or float32 array, label).

    Raises:
        DataError: not a Datum, an undecodable image, or a size that disagrees with
            channels x height x width (message names ``item``).
    """
    from ..caffe_io import parse_datum

    try:
        datum = parse_datum(raw)
    except ValueError as exc:
        raise DataError(f"{item}: {exc}") from None
    if datum.encoded:
        import cv2

        flag = (cv2.IMREAD_COLOR if force_color else
                cv2.IMREAD_GRAYSCALE if force_gray else cv2.IMREAD_UNCHANGED)
        img = cv2.imdecode(np.frombuffer(datum.data, np.uint8), flag)
        if img is None:
            raise DataError(f"{item}: cannot decode the encoded image "
                            f"({len(datum.data)} bytes); the record is damaged or not an image")
        if img.dtype != np.uint8:
            raise DataError(f"{item}: decoded image is {img.dtype}; Caffe needs 8-bit images")
        # a (C, H, W) view: the transform copies the pixels once, cropped
        return (img[None] if img.ndim == 2 else img.transpose(2, 0, 1)), int(datum.label)
    c, h, w = datum.channels, datum.height, datum.width
    if c <= 0 or h <= 0 or w <= 0:
        raise DataError(f"{item}: Datum has channels x height x width = {c}x{h}x{w}; "
                        "all must be positive")
    n = c * h * w
    if datum.data:
        if len(datum.data) != n:
            raise DataError(f"{item}: Datum data has {len(datum.data)} bytes but channels x "
                            f"height x width = {c}x{h}x{w} = {n}")
        array = np.frombuffer(datum.data, np.uint8).reshape(c, h, w)
    else:
        if len(datum.float_data) != n:
            raise DataError(f"{item}: Datum float_data has {len(datum.float_data)} values but "
                            f"channels x height x width = {c}x{h}x{w} = {n}")
        array = np.asarray(datum.float_data, np.float32).reshape(c, h, w)
    return array, int(datum.label)


def _check_backend(path: Path, backend: str, where: str) -> None:
    """A database of the other kind is the usual mistake (``backend`` defaults to LEVELDB)."""
    is_lmdb = (path / "data.mdb").exists() if path.is_dir() else path.suffix == ".mdb"
    is_leveldb = path.is_dir() and (path / "CURRENT").exists()
    if backend == "LEVELDB" and is_lmdb:
        raise DataError(f"{where}{path} is an LMDB database but data_param.backend is LEVELDB "
                        "(Caffe's default): set backend: LMDB")
    if backend == "LMDB" and is_leveldb:
        raise DataError(f"{where}{path} is a LevelDB database but data_param.backend is LMDB: "
                        "set backend: LEVELDB")


# One LMDB environment per database and process: py-lmdb refuses to open one twice, and an
# environment must not be used across fork (a worker opens its own).
_LMDB_ENVS: dict[str, object] = {}
_LMDB_PID: list[int] = [0]


def _lmdb_env(path: Path, where: str) -> object:
    import lmdb

    if _LMDB_PID[0] != os.getpid():
        for inherited in _LMDB_ENVS.values():  # the parent's: unmap here, reopen below
            inherited.close()  # type: ignore[attr-defined]
        _LMDB_ENVS.clear()
        _LMDB_PID[0] = os.getpid()
    key = str(Path(path).resolve())
    env = _LMDB_ENVS.get(key)
    if env is None:
        try:
            env = lmdb.open(str(path), readonly=True, lock=False, readahead=False,
                            meminit=False, max_readers=512, subdir=Path(path).is_dir())
        except lmdb.Error as exc:
            raise DataError(f"{where}cannot open LMDB {path}: {exc}") from None
        _LMDB_ENVS[key] = env
    return env


class DatumSource(Source):
    """An LMDB or LevelDB database of ``Datum`` records, by index in key order.

    Args:
        path: the database folder.
        backend: ``"LMDB"`` or ``"LEVELDB"``.
        force_color: decode encoded images in colour.
        force_gray: decode encoded images in grey.
        where: message prefix naming the prototxt and layer.

    Raises:
        DataError: the database cannot be opened or is empty.
    """

    def __init__(self, path: Path, backend: str, *, force_color: bool = False,
                 force_gray: bool = False, where: str = "") -> None:
        self.path = Path(path)
        self.backend = backend.upper()
        if self.backend not in ("LMDB", "LEVELDB"):
            raise DataError(f"{where}data_param.backend {backend!r}: LMDB or LEVELDB")
        _check_backend(self.path, self.backend, where)
        self.force_color = force_color
        self.force_gray = force_gray
        self.where = where
        self._h_db = None
        self._h_txn = None
        self._h_pid = None
        keys = self._list_keys()
        if not keys:
            raise DataError(f"{where}{self.backend} database {self.path} is empty")
        self._offsets = np.zeros(len(keys) + 1, np.int64)
        np.cumsum([len(k) for k in keys], out=self._offsets[1:])
        self._keys = b"".join(keys)
        self.close()

    # -- handles ----------------------------------------------------------------------------
    def _open(self) -> None:
        if self._h_txn is not None and self._h_pid == os.getpid():
            return
        self.close()  # a handle from another process (a forked worker) is not used
        self._h_pid = os.getpid()
        if self.backend == "LMDB":
            self._h_db = None  # the environment is shared by the process (see _lmdb_env)
            self._h_txn = _lmdb_env(self.path, self.where).begin(buffers=False)
        else:
            try:
                import plyvel
            except ImportError:
                raise DataError(
                    f"{self.where}{self.path} is a LevelDB database: reading it needs the "
                    "optional package plyvel (pip install plyvel), or convert it to LMDB"
                ) from None
            try:
                self._h_db = plyvel.DB(str(self.path), create_if_missing=False)
            except Exception as exc:  # plyvel.Error / IOError (a lock held elsewhere)
                raise DataError(f"{self.where}cannot open LevelDB {self.path}: {exc} (LevelDB "
                                "allows one process at a time: use workers=0, or LMDB)") from None
            self._h_txn = self._h_db

    def close(self) -> None:
        db, txn, self._h_db, self._h_txn = self._h_db, self._h_txn, None, None
        if txn is not None and self.backend == "LMDB" and self._h_pid == os.getpid():
            txn.abort()
        if db is not None:
            try:
                db.close()
            except Exception:  # closing a handle inherited from another process
                pass

    def _list_keys(self) -> list[bytes]:
        self._open()
        if self.backend == "LMDB":
            return list(self._h_txn.cursor().iternext(keys=True, values=False))
        return list(self._h_db.iterator(include_value=False))

    # -- Source -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._offsets) - 1

    def key(self, index: int) -> bytes:
        """The database key of record ``index``."""
        return self._keys[self._offsets[index]:self._offsets[index + 1]]

    def describe(self, index: int) -> str:
        key = self.key(index).decode("utf-8", "backslashreplace")
        return f"{self.path}: record {index} (key {key!r})"

    def read(self, index: int) -> tuple[np.ndarray, np.float32]:
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} out of range (database has {len(self)})")
        self._open()
        raw = self._h_txn.get(self.key(index))
        if raw is None:
            raise DataError(f"{self.where}{self.describe(index)}: record vanished (was the "
                            "database rewritten while reading?)")
        array, label = decode_datum(raw, force_color=self.force_color,
                                    force_gray=self.force_gray,
                                    item=self.where + self.describe(index))
        return array, np.float32(label)
