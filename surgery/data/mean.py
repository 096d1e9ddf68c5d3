"""Mean files: ``mean.binaryproto`` (``compute_image_mean``) <-> numpy.

A mean file is one ``BlobProto`` of shape (1, C, H, W) in the data's BGR channel order. Caffe's
``DataTransformer`` reads it with ``Blob::FromProto`` and indexes it as ``channels``, ``height``,
``width``; a mean is therefore used as a (C, H, W) float32 array here.
"""

from __future__ import annotations

import io
import os

import numpy as np

from ..errors import DataError

__all__ = ["read_mean", "write_mean", "read_npy", "convert_mean"]

PathLike = str | os.PathLike[str]


def read_mean(path: PathLike) -> np.ndarray:
    """Read a ``.binaryproto`` (or ``.npy``) mean as a (C, H, W) float32 array.

    Caffe reads the blob's legacy num/channels/height/width: a 4-D blob must have num 1; a
    2-D (H, W) blob is one channel; a 3-D (C, H, W) blob is taken as written.

    Raises:
        DataError: the file cannot be read, is not a mean blob, or has more than one image.
    """
    from ..caffe_io import read_blob_proto
    from ..errors import ParseError

    if str(path).endswith(".npy"):
        array = read_npy(path)
    else:
        try:
            array = read_blob_proto(path)
        except ParseError as exc:
            raise DataError(str(exc)) from None
    return _as_chw(array, path)


def _as_chw(array: np.ndarray, path: PathLike) -> np.ndarray:
    a = np.asarray(array, np.float32)
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    elif a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise DataError(
            f"{path}: a mean must be one image (1, C, H, W), (C, H, W) or (H, W); "
            f"found shape {tuple(array.shape)}"
        )
    return np.ascontiguousarray(a)


def read_npy(path: PathLike) -> np.ndarray:
    """``np.load`` without pickles, errors as :class:`DataError`.

    Raises:
        DataError: unreadable or not a numeric array.
    """
    from .._inputs import load_numpy
    from ..errors import ParseError

    try:
        a = load_numpy(path, "mean")
    except ParseError as exc:
        raise DataError(str(exc)) from None
    if not isinstance(a, np.ndarray) or a.dtype.kind not in "biuf":
        raise DataError(f"{path}: expected a numeric array, found {type(a).__name__}")
    return a


def write_mean(path: PathLike, mean: np.ndarray) -> None:
    """Write a mean atomically: ``.npy`` as (C, H, W) float32, else a ``BlobProto``
    (1, C, H, W) as ``compute_image_mean`` writes it.

    Raises:
        DataError: the array is not one image.
        SurgeryError: the file cannot be written.
    """
    from ..caffe_io import blob_proto_bytes, write_bytes_atomic

    a = _as_chw(mean, path)
    if str(path).endswith(".npy"):
        buf = io.BytesIO()
        np.save(buf, a, allow_pickle=False)
        write_bytes_atomic(path, buf.getvalue())
    else:
        write_bytes_atomic(path, blob_proto_bytes(a))


def convert_mean(src: PathLike, dst: PathLike) -> np.ndarray:
    """Convert a mean between ``.binaryproto`` and ``.npy`` (direction from ``dst``'s suffix).

    Returns:
        The (C, H, W) mean that was written.

    Raises:
        DataError: ``src`` is not a mean.
        SurgeryError: ``dst`` cannot be written.
    """
    mean = read_mean(src)
    write_mean(dst, mean)
    return mean
