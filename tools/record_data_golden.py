"""Record the reference Caffe's data-layer tops for the cases in tests/data_cases.py.

Run once (CI has no Caffe) after building the reference Caffe
(../shared/tools/build-reference-caffe.sh)::

    python tools/record_data_golden.py [--caffe ~/.cache/caffe-surgery/refcaffe/pycaffe]

It builds every case's tiny dataset in a temporary folder with this Python (lmdb, plyvel, h5py,
OpenCV for encoding), then runs pycaffe in each folder: ``caffe.Net("net.prototxt", phase)`` and
``net.forward(end="data")`` once per batch, keeping every top. It writes
tests/data/data_golden.npz: ``input/<name>`` the encoded image bytes the cases store (so tests
rebuild identical databases without re-encoding), ``<case>/<top>`` the tops of all batches
concatenated along the batch axis.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.data_cases import CASES, ENCODERS  # noqa: E402

CAFFE_SCRIPT = r"""
import json, os, sys
import numpy as np
import caffe
caffe.set_mode_cpu()
cases = json.loads(sys.argv[1])
for c in cases:
    os.chdir(c["folder"])
    net = caffe.Net("net.prototxt", getattr(caffe, c["phase"]))
    got = {t: [] for t in c["tops"]}
    for _ in range(c["batches"]):
        net.forward(end="data")
        for t in c["tops"]:
            got[t].append(net.blobs[t].data.copy())
    np.savez(os.path.join(c["folder"], "tops.npz"),
             **{t: np.concatenate(v) for t, v in got.items()})
    del net
print("recorded", len(cases), "cases")
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--caffe", default=str(Path.home() / ".cache/caffe-surgery/refcaffe/pycaffe"))
    ap.add_argument("-o", default=str(ROOT / "tests" / "data" / "data_golden.npz"))
    args = ap.parse_args()
    blobs = {k: np.frombuffer(f(), np.uint8) for k, f in ENCODERS.items()}
    out: dict[str, np.ndarray] = {f"input/{k}": v for k, v in blobs.items()}
    with tempfile.TemporaryDirectory() as tmp:
        jobs = []
        for case in CASES:
            folder = Path(tmp) / case.name
            folder.mkdir()
            case.build(folder, blobs)
            jobs.append({"folder": str(folder), "phase": case.phase, "batches": case.batches,
                         "tops": case.tops})
        subprocess.run([args.caffe, "-c", CAFFE_SCRIPT, json.dumps(jobs)], check=True)
        for case in CASES:
            with np.load(Path(tmp) / case.name / "tops.npz") as z:
                for top in case.tops:
                    out[f"{case.name}/{top}"] = z[top]
    np.savez_compressed(args.o, **out)
    print(f"wrote {args.o}: {len(out)} arrays, {Path(args.o).stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
