"""``ImageData`` layer source: a list file of ``path label`` lines, images read with OpenCV.

As Caffe's ``ImageDataLayer`` (BVLC 1.0): each line is split at its *last* space, so paths may
contain spaces; the image is ``root_folder + path`` (plain concatenation, as Caffe does), read
with ``cv::imread`` in colour (``is_color``, the default) or grey, and resized to
``new_height`` x ``new_width`` with ``cv::resize``'s default ``INTER_LINEAR`` when both are set.
Pixels stay BGR as OpenCV gives them. ``shuffle`` reorders the list at the start and at every
wrap (seeded here).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DataError
from .source import Resolved, Source

__all__ = ["ImageListSource", "parse_list"]


def parse_list(path: Path, where: str = "") -> list[tuple[str, int, int]]:
    """The ``(path, label, line number)`` entries of an ImageData list file.

    Raises:
        DataError: unreadable file, no entries, or a line without ``PATH LABEL``.
    """
    try:
        text = path.read_bytes().decode("utf-8", "surrogateescape")
    except OSError as exc:
        raise DataError(f"{where}cannot read list file {path}: {exc.strerror or exc}") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline ending the last line starts no new line (std::getline)
    entries = []
    for number, line in enumerate(lines, 1):
        line = line.removesuffix("\r")
        pos = line.rfind(" ")
        label_text = line[pos + 1:]
        try:
            label = int(label_text)
        except ValueError:
            label = None
        if pos <= 0 or label is None:
            raise DataError(f"{where}{path}:{number}: expected 'PATH LABEL' (the label an "
                            f"integer after the last space), found {line!r}")
        entries.append((line[:pos], label, number))
    if not entries:
        raise DataError(f"{where}list file {path} is empty")
    return entries


class ImageListSource(Source):
    """The images of an ImageData list file, by line.

    Args:
        path: the list file.
        root_folder: prefix of every path (concatenated, as Caffe).
        new_height: resize height (0: no resize).
        new_width: resize width (0: no resize).
        is_color: read in colour (3 channels) or grey (1).
        net_source: the prototxt, to find relative images.
        where: message prefix naming the prototxt and layer.

    Raises:
        DataError: the list is empty or malformed, or only one of new_height/new_width is set.
    """

    def __init__(self, path: Path, *, root_folder: str = "", new_height: int = 0,
                 new_width: int = 0, is_color: bool = True, net_source: str | None = None,
                 where: str = "") -> None:
        if (new_height > 0) != (new_width > 0):
            raise DataError(f"{where}new_height and new_width must be set together "
                            f"(found {new_height} and {new_width})")
        self.path = Path(path)
        self.where = where
        self.root_folder = root_folder
        self.new_height, self.new_width = new_height, new_width
        self.is_color = is_color
        self.entries = parse_list(self.path, where)
        self.base = self._find_base(net_source)
        self.resolved = [Resolved("image_data_param.root_folder", root_folder or "",
                                  self.base / root_folder if root_folder else self.base)]

    def _find_base(self, net_source: str | None) -> Path:
        """Where relative images live: the working directory, else the prototxt's folder
        (decided by the first image)."""
        first = self.root_folder + self.entries[0][0]
        if Path(first).is_absolute():
            return Path("/")
        bases = [Path.cwd()]
        if net_source:
            bases.append(Path(net_source).resolve().parent)
        for base in bases:
            if (base / first).exists():
                return base
        return bases[0]

    def __len__(self) -> int:
        return len(self.entries)

    def image_path(self, index: int) -> Path:
        """The file of entry ``index``."""
        return self.base / (self.root_folder + self.entries[index][0])

    def describe(self, index: int) -> str:
        _, _, number = self.entries[index]
        return f"{self.path}:{number} ({self.image_path(index)})"

    def read(self, index: int) -> tuple[np.ndarray, np.float32]:
        import cv2

        path = self.image_path(index)
        img = cv2.imread(str(path), cv2.IMREAD_COLOR if self.is_color else cv2.IMREAD_GRAYSCALE)
        if img is None:
            what = "cannot decode the image" if path.is_file() else "image not found"
            raise DataError(f"{self.where}{self.describe(index)}: {what}")
        if self.new_height > 0:
            img = cv2.resize(img, (self.new_width, self.new_height))
        chw = img[None] if img.ndim == 2 else img.transpose(2, 0, 1)  # a view, copied once
        return chw, np.float32(self.entries[index][1])

    def epoch_order(self, epoch: int, seed: int) -> np.ndarray:
        return np.random.default_rng([seed, 3, epoch]).permutation(len(self))
