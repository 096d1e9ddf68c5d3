"""What every data source shares: finding files as Caffe does, and the source interface.

Caffe opens ``source``, ``mean_file`` and the files a list names relative to the process's
working directory. A prototxt is often used from elsewhere, so a relative path is looked up in
the working directory first, then in the prototxt's folder; the path used is recorded
(``Resolved``) and reported by ``surgery data``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError

__all__ = ["Resolved", "resolve_path", "Source"]


@dataclass(frozen=True)
class Resolved:
    """One path as written in the prototxt and the file it was found at."""

    field: str
    written: str
    path: Path


def resolve_path(written: str, field: str, *, net_source: str | None, where: str,
                 must_be: str = "exist") -> Resolved:
    """Find ``written`` relative to the working directory, then to the prototxt's folder.

    Args:
        written: the path as the prototxt writes it.
        field: the field it came from (``"data_param.source"``), for messages.
        net_source: the prototxt's path (``Net.source``), or None.
        where: message prefix naming the prototxt and layer.
        must_be: ``"exist"``, ``"file"`` or ``"dir"``.

    Raises:
        DataError: not found in any of the places (all are named).
    """
    if not written:
        raise DataError(f"{where}{field} is not set; name the data file")
    p = Path(written).expanduser()
    tried = [p] if p.is_absolute() else [Path.cwd() / p]
    if not p.is_absolute() and net_source:
        tried.append(Path(net_source).resolve().parent / p)
    for cand in tried:
        ok = {"exist": cand.exists, "file": cand.is_file, "dir": cand.is_dir}[must_be]()
        if ok:
            return Resolved(field, written, cand)
    looked = " or ".join(str(t) for t in dict.fromkeys(tried))
    kind = {"exist": "", "file": " (a file)", "dir": " (a folder)"}[must_be]
    fix = ("run from the folder it is relative to, or put it (a link will do) at one of those"
           if not p.is_absolute() else "fix the path in the prototxt")
    raise DataError(f"{where}{field} {written!r} not found{kind}: looked for {looked}; {fix}")


class Source:
    """A Caffe data source: ``len()`` samples, read one by index.

    Subclasses set ``path`` (the resolved source) and implement :meth:`read` and
    :meth:`describe`; :meth:`epoch_order` says how a shuffling source orders one pass.
    Handles to files are opened lazily in each process (after a DataLoader worker forks).
    """

    path: Path

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, index: int) -> tuple[np.ndarray | float, ...]:
        """The raw arrays of sample ``index`` (image (C, H, W), then label if any)."""
        raise NotImplementedError

    def describe(self, index: int) -> str:
        """Names sample ``index`` for error messages (file, key, line)."""
        return f"{self.path}: sample {index}"

    def epoch_order(self, epoch: int, seed: int) -> np.ndarray | None:
        """The source indices of pass ``epoch`` in order, or None for 0..len-1."""
        return None

    def close(self) -> None:
        """Drop open handles (reopened on the next read)."""

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for k in [k for k in state if k.startswith("_h_")]:
            state[k] = None
        return state
