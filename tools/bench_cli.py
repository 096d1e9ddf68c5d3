"""Time `surgery info` on definitions (whole process, as a user runs it).

Usage: python tools/bench_cli.py [NET.prototxt ...] [--runs 7]

Prints the median and best wall time per file and checks that the info path imported neither
torch nor onnx. Target: under 0.3 s per call.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = [
    ROOT / "models" / "lenet.prototxt",
    ROOT.parent / "shared" / "zoo" / "bvlc_googlenet" / "train_val.prototxt",
    ROOT.parent / "shared" / "zoo" / "resnet101_v2_preact" / "deploy_resnet101-v2.prototxt",
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("nets", nargs="*", type=Path)
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    nets = args.nets or [p for p in DEFAULT if p.exists()]
    base = []
    for _ in range(args.runs):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        base.append(time.perf_counter() - t)
    print(f"{'python startup':60s} median {statistics.median(base):.3f} s")
    for net in nets:
        times = []
        for _ in range(args.runs):
            t = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "surgery", "info", str(net)],
                check=True, stdout=subprocess.DEVNULL,
            )
            times.append(time.perf_counter() - t)
        print(f"surgery info {net.name:47s} median {statistics.median(times):.3f} s, "
              f"best {min(times):.3f} s")
    code = (
        "import sys; from surgery.cli import main; "
        f"main(['info', {str(nets[0])!r}]); "
        "print([m for m in ('torch', 'onnx', 'onnxruntime', 'cv2') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
    print("heavy modules imported on the info path:", out.strip().splitlines()[-1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
