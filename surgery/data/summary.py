"""Read through a data layer and say what the net will see (``surgery data``).

:func:`summarize` reads ``count`` samples in Caffe's order and reports each top's shape, dtype,
value range, a label histogram and the read rate; :func:`dump` writes the samples as ``.npy``
and, for image tops, as PNGs with the scale and mean undone (BGR as stored, which is what
OpenCV writes), so a user can look at the pixels the net is fed.
"""

from __future__ import annotations

import io
import itertools
import math
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from .datasets import CaffeDataset

__all__ = ["summarize", "dump"]


def summarize(ds: CaffeDataset, count: int | None = None, *, workers: int = 0,
              seed: int | None = None, batch_size: int | None = None
              ) -> tuple[dict[str, Any], list[np.ndarray]]:
    """Read ``count`` samples (default: one batch) through the layer's loader.

    Returns:
        (report, tops): the report dict (layer, phase, source, files used, samples, seconds,
        samples_per_s, per-top shape/dtype/min/max/mean and a histogram for scalar tops) and
        one array per top holding the ``count`` samples.

    Raises:
        DataError: a bad ``count``, or anything reading the samples raises.
    """
    from .loaders import make_loader

    count = ds.batch_size if count is None else int(count)
    if count <= 0:
        raise DataError(f"--count must be positive (found {count})")
    bs = min(batch_size or ds.batch_size, count)
    ld = make_loader(ds, batch_size=bs, workers=workers, seed=seed)
    start = time.perf_counter()
    batches = list(itertools.islice(ld, math.ceil(count / bs)))
    seconds = time.perf_counter() - start
    tops = [np.concatenate([b[j].numpy() for b in batches])[:count]
            for j in range(len(ds.tops))]
    rep: dict[str, Any] = {
        "layer": ds.layer.name,
        "type": ds.layer.type,
        "phase": ds.phase,
        "source": str(ds.source.path),
        "source_size": len(ds),
        "files": [{"field": r.field, "written": r.written, "used": str(r.path)}
                  for r in ds.resolved],
        "notes": list(ds.notes),
        "samples": count,
        "batch_size": bs,
        "workers": workers,
        "seconds": round(seconds, 4),
        "samples_per_s": round(count / seconds, 1) if seconds > 0 else None,
        "tops": [],
    }
    for name, a in zip(ds.tops, tops, strict=True):
        top: dict[str, Any] = {
            "name": name, "shape": list(a.shape[1:]), "dtype": str(a.dtype),
            "min": float(a.min()), "max": float(a.max()), "mean": float(a.mean()),
        }
        if a.ndim == 1 or (a.ndim > 1 and math.prod(a.shape[1:]) == 1):
            hist = Counter(float(v) for v in a.ravel())
            top["histogram"] = {_label(k): v for k, v in sorted(hist.items())}
        rep["tops"].append(top)
    return rep, tops


def _label(v: float) -> str:
    return str(int(v)) if v == int(v) else repr(v)


def _is_image(a: np.ndarray) -> bool:
    return a.ndim == 4 and a.shape[1] in (1, 3)


def dump(ds: CaffeDataset, tops: list[np.ndarray], folder: str | os.PathLike[str]
         ) -> list[str]:
    """Write every sample's tops as ``NNNN_<top>.npy`` and image tops as ``NNNN_<top>.png``.

    The PNG undoes scale and mean (a mean file's centre crop) and clips to 0..255; mirroring
    is not undone. The files are written as one set (:mod:`surgery._atomic`): all or none; a
    missing folder appears only when complete.

    Returns:
        The file names written.

    Raises:
        SurgeryError: the folder cannot be created or a file cannot be written.
    """
    from .. import _atomic
    from ..errors import SurgeryError

    out = Path(folder)
    if out.exists() and not out.is_dir():
        raise SurgeryError(f"--dump {folder}: exists and is not a folder")
    new_folder = not out.exists()
    if new_folder:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SurgeryError(f"--dump {folder}: cannot create: {exc.strerror or exc}") from None
    written = []
    safe = ["".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in t) for t in ds.tops]
    with _atomic.outputs() as tx:  # every file or none (a new folder appears when complete)
        base = tx.folder(out) if new_folder else None

        def put(fname: str, data: bytes) -> None:
            if base is None:
                tx.write_bytes(out / fname, data)
                return
            try:
                (base / fname).write_bytes(data)
            except OSError as exc:
                raise SurgeryError(f"--dump {folder}: cannot write {fname}: "
                                   f"{exc.strerror or exc}") from None

        for i in range(len(tops[0])):
            for name, a in zip(safe, tops, strict=True):
                buf = io.BytesIO()
                np.save(buf, a[i], allow_pickle=False)
                fname = f"{i:04d}_{name}.npy"
                put(fname, buf.getvalue())
                written.append(fname)
                if _is_image(a) and ds.transformer is not None:
                    import cv2

                    pixels = ds.transformer.undo(a[i])
                    img = np.clip(np.rint(pixels), 0, 255).astype(np.uint8).transpose(1, 2, 0)
                    ok, png = cv2.imencode(".png", img)
                    if ok:
                        fname = f"{i:04d}_{name}.png"
                        put(fname, png.tobytes())
                        written.append(fname)
    return written
