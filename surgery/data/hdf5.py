"""``HDF5Data`` layer source: a list of ``.h5`` files, one dataset per top.

As Caffe's ``HDF5DataLayer``: the source is a text file of HDF5 file names (separated by white
space); every top reads the dataset of its own name; all of a file's tops have the same first
axis (rows); rows are read file after file, wrapping at the end. Values become float32, as
Caffe's blobs. ``shuffle`` reorders the files and the rows of each file every pass (seeded here).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import DataError
from .source import Source, resolve_path

__all__ = ["HDF5Source"]


class HDF5Source(Source):
    """The rows of the HDF5 files a list names, in list order.

    Args:
        path: the list file.
        tops: the top names (= dataset names).
        net_source: the prototxt, to find relative files.
        where: message prefix naming the prototxt and layer.

    Raises:
        DataError: empty list, missing file or dataset, or shapes that disagree.
    """

    def __init__(self, path: Path, tops: list[str], *, net_source: str | None = None,
                 where: str = "") -> None:
        import h5py

        self.path = Path(path)
        self.tops = list(tops)
        self.where = where
        try:
            names = self.path.read_text(encoding="utf-8", errors="surrogateescape").split()
        except OSError as exc:
            raise DataError(f"{where}cannot read {path}: {exc.strerror or exc}") from None
        if not names:
            raise DataError(f"{where}{path} lists no HDF5 file")
        self.resolved = [resolve_path(n, f"{self.path.name} entry {i + 1}", net_source=net_source,
                                      where=where, must_be="file")
                         for i, n in enumerate(names)]
        self.files = [r.path for r in self.resolved]
        rows: list[int] = []
        self.shapes: list[tuple[int, ...]] | None = None
        for f in self.files:
            try:
                with h5py.File(f, "r") as h:
                    shapes = []
                    for top in self.tops:
                        if top not in h or not isinstance(h[top], h5py.Dataset):
                            raise DataError(f"{where}{f}: no dataset {top!r} (each top reads "
                                            f"the dataset of its name; the file has "
                                            f"{sorted(h.keys())})")
                        shapes.append(tuple(h[top].shape))
            except OSError as exc:
                raise DataError(f"{where}{f}: cannot read as HDF5: {exc}") from None
            if any(len(s) < 1 for s in shapes):
                raise DataError(f"{where}{f}: datasets need at least one axis (rows)")
            n = shapes[0][0]
            if any(s[0] != n for s in shapes):
                raise DataError(f"{where}{f}: datasets have different row counts: "
                                + ", ".join(f"{t} {s}" for t, s in
                                            zip(self.tops, shapes, strict=True)))
            if n == 0:
                raise DataError(f"{where}{f}: no rows")
            trailing = [s[1:] for s in shapes]
            if self.shapes is None:
                self.shapes = trailing
            elif trailing != self.shapes:
                raise DataError(f"{where}{f}: row shapes {trailing} differ from the first "
                                f"file's {self.shapes} (tops {self.tops})")
            rows.append(n)
        self.offsets = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
        self._h_files: dict[Path, object] | None = None
        self._h_pid: int | None = None

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """(file number, row) of sample ``index``."""
        f = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return f, index - int(self.offsets[f])

    def describe(self, index: int) -> str:
        f, row = self.locate(index)
        return f"{self.files[f]}: row {row}"

    def close(self) -> None:
        files, self._h_files = self._h_files, None
        for h in (files or {}).values():
            try:
                h.close()  # type: ignore[attr-defined]
            except Exception:
                pass

    def read(self, index: int) -> tuple[np.ndarray, ...]:
        import h5py

        if not 0 <= index < len(self):
            raise IndexError(f"row {index} out of range ({len(self)} rows)")
        if self._h_files is None or self._h_pid != os.getpid():
            self._h_files, self._h_pid = {}, os.getpid()
        f, row = self.locate(index)
        path = self.files[f]
        h = self._h_files.get(path)
        try:
            if h is None:
                h = self._h_files[path] = h5py.File(path, "r")
            return tuple(np.asarray(h[top][row], np.float32) for top in self.tops)
        except OSError as exc:
            raise DataError(f"{self.where}{self.describe(index)}: cannot read: {exc}") from None

    def epoch_order(self, epoch: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng([seed, 4, epoch])
        parts = []
        for f in rng.permutation(len(self.files)):
            n = int(self.offsets[f + 1] - self.offsets[f])
            parts.append(self.offsets[f] + rng.permutation(n))
        return np.concatenate(parts)
