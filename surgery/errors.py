"""Errors raised by caffe-surgery.

Every message says what happened, where (file:line, layer, blob), what was expected and what
was found, and how to fix it. The CLI prints one line and exits with code 2.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "SurgeryError",
    "ParseError",
    "NetError",
    "LayerNotFoundError",
    "ShapeMismatchError",
    "UnsupportedLayerError",
    "DataError",
    "SolverError",
    "did_you_mean",
    "printable",
]


class SurgeryError(Exception):
    """Base class for every error this package raises on bad input."""


class ParseError(SurgeryError):
    """A file could not be read as a Caffe definition or weight file."""


class NetError(SurgeryError):
    """The network is inconsistent (what Caffe itself would refuse)."""


class LayerNotFoundError(SurgeryError, KeyError):
    """A layer or blob name does not exist in the net."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class ShapeMismatchError(SurgeryError):
    """Two blobs that must agree in shape do not."""


class UnsupportedLayerError(SurgeryError):
    """One or more layers cannot be handled by the requested operation or export."""


class DataError(SurgeryError):
    """A data source (database, list file, image, HDF5 or mean file) cannot be read as the
    data layer needs; the message names the file and the item (key, line or row)."""


class SolverError(SurgeryError):
    """A solver file, solver state or training run Caffe would refuse (or we cannot honour)."""


def printable(text: str) -> str:
    """``text`` with every control character (newline, ESC, NUL, DEL, C1) written as
    ``\\xNN``: names from a file printed this way cannot drive the terminal or split a row."""
    return "".join(
        f"\\x{ord(c):02x}" if (ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0
                               or c in "\u2028\u2029") else c
        for c in text
    )


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """Return ' (did you mean 'x'?)' for the closest candidate, or ''."""
    close = difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.5)
    if not close:
        return ""
    return " (did you mean " + " or ".join(repr(c) for c in close) + "?)"
