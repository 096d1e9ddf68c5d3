"""The model-zoo sweep: ``surgery convert`` over ``../shared/zoo`` (kept for old command lines).

    python tools/zoo_convert.py [PATH ...] [-o OUT] [surgery convert options ...]

Without PATH, every net definition under ``../shared/zoo``; without ``-o``, a temp folder. The
pipeline itself is :mod:`surgery.convert` (``surgery convert --help``).
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ZOO = (ROOT.parent / "shared" / "zoo").resolve()


def main(argv: Sequence[str] | None = None) -> int:
    sys.path.insert(0, str(ROOT))
    from surgery.cli import main as surgery_main

    args = list(sys.argv[1:] if argv is None else argv)
    if not any(a in ("-h", "--help") for a in args):
        if not any(a in ("-o", "--output") or a.startswith("--output=") for a in args):
            args += ["-o", tempfile.mkdtemp(prefix="zoo-convert-")]
        takes_value = {"-o", "--output", "--to", "--verify", "--caffe", "--jobs", "-j",
                       "--timeout", "--only", "--skip", "--input-shape", "--seed",
                       "--tolerance", "--report", "--json"}
        positional = [a for i, a in enumerate(args)
                      if not a.startswith("-") and (i == 0 or args[i - 1] not in takes_value)]
        if not positional:
            args.insert(0, str(ZOO))
    return surgery_main(["convert", *args])


if __name__ == "__main__":
    sys.exit(main())
