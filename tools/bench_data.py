"""Samples/s of surgery.data's DataLoader against Caffe's own Data layer, in one run.

Builds an LMDB of N JPEG-encoded 256x256 colour images (``convert_imageset --encoded`` style
Datums, seeded pixels: smooth gradients plus noise, ~20 KB each) and a TRAIN Data layer with
``crop_size: 227 mirror: true mean_value: 104/117/123``, then times:

- ours: ``surgery.data.loader(..., workers=W)`` (default 2), batches of B;
- Caffe: the reference pycaffe ``net.forward(end="data")`` on the same prototxt (its prefetch
  thread decodes and transforms while the main thread copies the batch out);

each after ``--warmup`` batches (start-up excluded, the prefetch queues drained: the consumer
does nothing, so in steady state both run at the producer's speed), ``--repeat`` times,
interleaved. It also reports CPU time per sample -- ours: the main process and its workers
(start-up and warm-up included), Caffe's: its whole process during the timed batches (prefetch
thread and batch copy) -- which a machine shared with other jobs disturbs less than samples/s.

usage: python tools/bench_data.py [--images 300] [--batch 32] [--batches 30] [--workers 2]
                                  [--repeat 3]
                                  [--caffe ~/.cache/caffe-surgery/refcaffe/pycaffe]
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NET = """name: "bench"
layer {{
  name: "data" type: "Data" top: "data" top: "label"
  include {{ phase: TRAIN }}
  transform_param {{ crop_size: 227 mirror: true mean_value: 104 mean_value: 117
                    mean_value: 123 }}
  data_param {{ source: "{db}" backend: LMDB batch_size: {batch} }}
}}
layer {{ name: "flat" type: "Flatten" bottom: "data" top: "flat" }}
"""

CAFFE = r"""
import sys, time, json
import caffe
caffe.set_mode_cpu()
net = caffe.Net(sys.argv[1], caffe.TRAIN)
n, warm = int(sys.argv[2]), int(sys.argv[3])
for _ in range(warm):
    net.forward(end="data")
t, c = time.perf_counter(), time.process_time()
for _ in range(n):
    net.forward(end="data")
print(json.dumps({"seconds": time.perf_counter() - t, "cpu": time.process_time() - c}))
"""


def build_lmdb(path: Path, n: int) -> int:
    import cv2
    import lmdb

    from surgery.caffe_io import datum_bytes

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:256, 0:256]
    env = lmdb.open(str(path), map_size=1 << 30)
    total = 0
    with env.begin(write=True) as txn:
        for i in range(n):
            a, b, c = rng.uniform(0.2, 1.0, 3)
            img = np.stack([(yy * a + xx * b) % 256, (xx * c + 40 * i) % 256,
                            (yy * b - xx * a) % 256], axis=-1)
            img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
            ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
            assert ok
            total += len(buf)
            txn.put(f"{i:08d}_img{i}.jpg".encode(),
                    datum_bytes(buf.tobytes(), label=i % 10, encoded=True))
    env.close()
    return total // n


def _cpu() -> float:
    """CPU seconds of this process and of its reaped children (the DataLoader workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def bench_ours(proto: Path, batches: int, workers: int, warm: int) -> tuple[float, float]:
    """(wall seconds for ``batches`` batches after ``warm``, CPU seconds of the main process
    and its workers for all ``warm + batches``, worker start-up included)."""
    import surgery.data as sd

    c = _cpu()
    ld = sd.loader(proto, "data", "train", workers=workers, seed=0)
    it = iter(ld)
    for _ in itertools.islice(it, warm):
        pass
    t = time.perf_counter()
    for _ in itertools.islice(it, batches):
        pass
    wall = time.perf_counter() - t
    del it, ld  # workers shut down and reaped: their CPU time is counted
    gc.collect()
    return wall, _cpu() - c


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batches", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=10,
                    help="batches read before timing (drains the prefetch queues)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3, help="interleaved runs of each")
    ap.add_argument("--caffe", default=str(Path.home() / ".cache/caffe-surgery/refcaffe/pycaffe"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "db"
        size = build_lmdb(db, args.images)
        proto = Path(tmp) / "net.prototxt"
        proto.write_text(NET.format(db=db, batch=args.batch))
        samples = args.batch * args.batches
        runs: dict[str, list[float]] = {"ours": [], "caffe": []}
        cpu: list[float] = []
        have_caffe = Path(args.caffe).exists()
        for _ in range(args.repeat):  # interleaved, so both see the same machine load
            wall, used = bench_ours(proto, args.batches, args.workers, args.warmup)
            runs["ours"].append(wall)
            cpu.append(used / ((args.batches + args.warmup) * args.batch))
            if have_caffe:
                r = subprocess.run([args.caffe, "-c", CAFFE, str(proto), str(args.batches),
                                    str(args.warmup)], capture_output=True, text=True,
                                   check=True)
                got = json.loads(r.stdout.strip().splitlines()[-1])
                runs["caffe"].append(got["seconds"])
                caffe_cpu = got["cpu"]
        ours = float(np.median(runs["ours"]))
        res = {"images": args.images, "jpeg_bytes_avg": size, "batch": args.batch,
               "batches": args.batches, "repeat": args.repeat, "cpus": os.cpu_count(),
               "load_avg_1min": round(os.getloadavg()[0], 2),
               "ours_workers": args.workers,
               "ours_samples_per_s": [round(samples / t, 1) for t in runs["ours"]],
               "ours_cpu_ms_per_sample": round(float(np.median(cpu)) * 1e3, 3)}
        if have_caffe:
            caffe = float(np.median(runs["caffe"]))
            res["caffe_samples_per_s"] = [round(samples / t, 1) for t in runs["caffe"]]
            res["caffe_cpu_ms_per_sample"] = round(caffe_cpu / samples * 1e3, 3)
            res["median_ratio"] = round(caffe / ours, 2)
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
