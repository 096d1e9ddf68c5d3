"""Opening input files safely: regular files only, sizes checked before anything is allocated.

A FIFO, a device (``/dev/zero``, ``/dev/urandom``), a socket or a folder given where a file is
expected would block forever or be read until memory runs out; they are refused up front, before
a byte is read. Opening uses ``O_NONBLOCK`` so that even the ``open`` of a FIFO with no writer
returns at once.

This module sits with ``errors`` at the ground of the package: the readers (``_wire``,
``caffe_io``, ``verify``, the recipe loader) all open their inputs through it.
"""

from __future__ import annotations

import os
import stat
from typing import Any, BinaryIO

from .errors import ParseError, SurgeryError

__all__ = ["open_regular", "read_regular", "check_regular", "default_max_bytes",
           "check_alloc", "set_max_bytes", "load_numpy"]

PathLike = str | os.PathLike[str]


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def open_regular(path: PathLike, what: str = "file") -> BinaryIO:
    """Open ``path`` for binary reading, refusing anything that is not a regular file.

    Args:
        path: the file.
        what: what the file is for, used in the message ("weights", "definition", ...).

    Raises:
        ParseError: missing, unreadable, or not a regular file (the message names the file).
    """
    p = os.fspath(path)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0)
                     | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise ParseError(f"{p}: cannot read the {what}: {exc.strerror or exc}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ParseError(f"{p}: the {what} is {_kind(mode)}; give a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def check_regular(path: PathLike, what: str = "file") -> None:
    """Raise :class:`ParseError` unless ``path`` is a readable regular file."""
    open_regular(path, what).close()


def read_regular(path: PathLike, what: str = "file", max_bytes: int | None = None) -> bytes:
    """The bytes of a regular file, refusing one larger than ``max_bytes``.

    Raises:
        ParseError: not a readable regular file, or too large.
    """
    with open_regular(path, what) as f:
        size = os.fstat(f.fileno()).st_size
        if max_bytes is not None and size > max_bytes:
            raise ParseError(f"{os.fspath(path)}: the {what} is {size:,} bytes, more than the "
                             f"limit of {max_bytes:,}")
        try:
            return f.read()
        except OSError as exc:
            raise ParseError(f"{os.fspath(path)}: cannot read the {what}: "
                             f"{exc.strerror or exc}") from None


def load_numpy(path: PathLike, what: str = "array file") -> Any:
    """``np.load`` of a regular file without pickles: an array (.npy) or a dict of arrays
    (.npz), numbers only.

    Raises:
        ParseError: not a regular file, truncated, not .npy/.npz, or non-numeric arrays.
    """
    import zipfile

    import numpy as np

    p = os.fspath(path)
    with open_regular(p, what) as f:
        try:
            loaded = np.load(f, allow_pickle=False)
            if isinstance(loaded, np.ndarray):
                arrays: Any = loaded
                check = {"": loaded}
            else:
                with loaded as z:
                    arrays = {k: z[k] for k in z.files}
                check = arrays
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile,
                NotImplementedError, TypeError) as exc:
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ParseError(f"{p}: cannot read the {what} as .npy/.npz: {msg}") from None
    for k, a in check.items():
        if a.dtype.kind not in "biuf":
            raise ParseError(f"{p}: array {k or 0!r} holds {a.dtype} values, not numbers")
    return arrays


_max_bytes: int | None = None


def set_max_bytes(limit: int | None) -> int | None:
    """Set the allocation limit used by :func:`check_alloc` (None: the default); returns the
    previous setting. The CLI's ``--max-bytes`` calls this."""
    global _max_bytes
    old, _max_bytes = _max_bytes, limit
    return old


def default_max_bytes() -> int:
    """The allocation limit: ``--max-bytes`` when set, else a quarter of the machine's
    physical memory (8 GiB when it cannot be read)."""
    if _max_bytes is not None:
        return _max_bytes
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 32 << 30
    return max(total // 4, 64 << 20)


def check_alloc(nbytes: int, where: str, max_bytes: int | None = None) -> None:
    """Refuse to allocate ``nbytes`` when it exceeds ``max_bytes`` (default
    :func:`default_max_bytes`).

    Args:
        nbytes: the size about to be allocated.
        where: what it is for, with the layer or blob ("layer 'fc8' blob 0 (1000000 x 4096)").
        max_bytes: the limit; the CLI passes ``--max-bytes``.

    Raises:
        SurgeryError: over the limit (the message names the limit and ``--max-bytes``).
    """
    limit = default_max_bytes() if max_bytes is None else max_bytes
    if nbytes > limit:
        raise SurgeryError(
            f"{where} needs {nbytes:,} bytes, more than the limit of {limit:,} "
            f"(--max-bytes, default a quarter of RAM); check the sizes or raise --max-bytes"
        )
