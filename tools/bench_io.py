"""Benchmark caffemodel I/O: surgery._wire against protobuf and against raw file I/O.

One run writes a VGG16-sized caffemodel (13 convolutions, fc6 25088x4096, fc7, fc8; about
553 MB of random float32) with ``write_caffemodel``, then measures:

- load, each in a fresh subprocess so its peak RSS (VmHWM) is its own:
  ``ours``      read_caffemodel + np.sum over every array (so every byte is really read),
  ``protobuf``  NetParameter.ParseFromString + np.array(blob.data, np.float32) per blob
                (then the same np.sum, reported separately),
  ``raw``       f.read() of the whole file: the floor for anything that reads every byte;
- write: write_caffemodel against writing the same number of bytes with one f.write().

Page cache: before each load the tool asks the kernel to drop caches (needs root and a kernel
that allows it; ``--warm`` skips it). When that is refused the loads run on a warm cache, which
the report says. Peak RSS counts the file-backed pages of our mapping once they are touched.

Targets checked: our load (with the sum) >= 20x faster than the protobuf path, our peak RSS
<= 1.2x the file size, our write <= 1.5x the raw write.

Usage::

    python tools/bench_io.py [--path FILE] [--repeat N] [--warm] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from surgery._wire import read_caffemodel, write_caffemodel  # noqa: E402

# (name, type, weight shape, bias length) for VGG16 (Simonyan & Zisserman, configuration D).
_CONV = [(64, 3), (64, 64), (128, 64), (128, 128), (256, 128), (256, 256), (256, 256),
         (512, 256), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512)]  # fmt: skip
_CONV_NAMES = ["conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3",
               "conv4_1", "conv4_2", "conv4_3", "conv5_1", "conv5_2", "conv5_3"]  # fmt: skip
VGG16 = [
    *(
        (name, "Convolution", (o, i, 3, 3), o)
        for name, (o, i) in zip(_CONV_NAMES, _CONV, strict=True)
    ),
    ("fc6", "InnerProduct", (4096, 25088), 4096),
    ("fc7", "InnerProduct", (4096, 4096), 4096),
    ("fc8", "InnerProduct", (1000, 4096), 1000),
]

TARGETS = {"load_speedup": 20.0, "peak_rss_ratio": 1.2, "write_ratio": 1.5}


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes(out + bytes([value]))


def _string_field(number: int, text: str) -> bytes:
    data = text.encode()
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def write_vgg16(path: Path, seed: int = 0) -> tuple[float, int, list[tuple[bytes, list]]]:
    """Write the VGG16-sized model with our writer; return (seconds, bytes, layers)."""
    rng = np.random.default_rng(seed)
    layers = []
    for name, kind, weight, bias in VGG16:
        # LayerParameter name=1, type=2: the same header bytes protobuf would write.
        header = _string_field(1, name) + _string_field(2, kind)
        blobs = [
            rng.standard_normal(weight, dtype=np.float32),
            rng.standard_normal(bias, np.float32),
        ]
        layers.append((header, blobs))
    net_header = _string_field(1, "VGG_ILSVRC_16_layers")
    start = time.perf_counter()
    size = write_caffemodel(path, net_header, layers)
    return time.perf_counter() - start, size, layers


def _drop_caches() -> bool:
    """Ask the kernel to drop the page cache; False when it refuses (not root, container)."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def _status_kib(key: str) -> int:
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across execve, so a child would report the
    # parent's peak (which holds the whole model in memory while writing it).
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/self/status")


def _child(mode: str, path: str) -> None:
    """Run one load in this (fresh) process and print its figures as JSON."""
    if mode == "protobuf":
        from surgery._proto import caffe_pb2  # imported before the baseline is taken
    baseline = _status_kib("VmRSS")
    start = time.perf_counter()
    arrays: list[np.ndarray] = []
    if mode == "ours":
        arrays = [b.data for layer in read_caffemodel(path).layers for b in layer.blobs]
    elif mode == "protobuf":
        net = caffe_pb2.NetParameter()
        with open(path, "rb") as f:
            net.ParseFromString(f.read())
        for layer in net.layer:
            for blob in layer.blobs:
                arrays.append(np.array(blob.data, np.float32).reshape(blob.shape.dim))
    else:
        with open(path, "rb") as f:
            data = f.read()
        assert len(data) == os.path.getsize(path)
    loaded = time.perf_counter()
    total = sum(float(np.sum(a)) for a in arrays)
    touched = time.perf_counter()
    peak = _status_kib("VmHWM")  # peak resident set, file-backed mmap pages included
    json.dump(
        {
            "load_s": loaded - start,
            "touch_s": touched - loaded,
            "peak_kib": peak,
            "baseline_kib": baseline,
            "checksum": total,
        },
        sys.stdout,
    )


def _run_child(mode: str, path: Path, cold: bool) -> dict:
    dropped = _drop_caches() if cold else False
    out = subprocess.run(
        [sys.executable, __file__, "--child", mode, str(path)],
        check=True,
        capture_output=True,
        text=True,
    )
    figures = json.loads(out.stdout)
    figures["cache_dropped"] = dropped
    return figures


def _best(runs: list[dict]) -> dict:
    best = min(runs, key=lambda r: r["load_s"] + r["touch_s"])
    return {**best, "peak_kib": max(r["peak_kib"] for r in runs)}


def _time_raw_write(path: Path, data: bytes) -> float:
    start = time.perf_counter()
    with open(path, "wb") as f:
        f.write(data)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print a table and return 0 when every target is met, else 1."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--path", type=Path, help="where to write the model (default: temp dir)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement (best kept)")
    parser.add_argument("--json", type=Path, help="also dump the figures here")
    parser.add_argument("--warm", action="store_true", help="do not drop the page cache")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(*args.child)
        return 0

    with tempfile.TemporaryDirectory(dir=args.path.parent if args.path else None) as tmp:
        path = args.path or Path(tmp) / "vgg16_bench.caffemodel"
        first_write_s, size, layers = write_vgg16(path)
        mib = size / 2**20

        # Writes: ours (from in-memory arrays, atomic rename included) vs one raw f.write().
        data = path.read_bytes()
        other = Path(tmp) / "write_bench.bin"
        ours_w, raw_w = [first_write_s], []
        for _ in range(args.repeat):
            raw_w.append(_time_raw_write(other, data))
            other.unlink()
            start = time.perf_counter()
            write_caffemodel(other, _string_field(1, "VGG_ILSVRC_16_layers"), layers)
            ours_w.append(time.perf_counter() - start)
            other.unlink()
        del data, layers

        # Loads, each in a fresh process; try for a cold cache before every run.
        cold = not args.warm and _drop_caches()
        if not cold:
            path.read_bytes()  # warm the cache for every mode alike
        loads = {
            mode: _best([_run_child(mode, path, cold) for _ in range(args.repeat)])
            for mode in ("ours", "protobuf", "raw")
        }
        if args.path is None:
            path.unlink()

    ours, proto, raw = loads["ours"], loads["protobuf"], loads["raw"]
    ours_total = ours["load_s"] + ours["touch_s"]
    figures = {
        "file_bytes": size,
        "cache": "cold (dropped before each load)"
        if cold
        else "warm" + ("" if args.warm else " (drop_caches refused)"),
        "loads": loads,
        "write_ours_s": min(ours_w),
        "write_raw_s": min(raw_w),
        "ratios": {
            "load_speedup": proto["load_s"] / ours_total,
            "load_speedup_both_summed": (proto["load_s"] + proto["touch_s"]) / ours_total,
            "scan_only_speedup": proto["load_s"] / ours["load_s"],
            "peak_rss_ratio": ours["peak_kib"] * 1024 / size,
            "peak_rss_ratio_above_baseline": (ours["peak_kib"] - ours["baseline_kib"])
            * 1024
            / size,
            "protobuf_peak_rss_ratio": proto["peak_kib"] * 1024 / size,
            "write_ratio": min(ours_w) / min(raw_w),
        },
    }
    r = figures["ratios"]
    figures["targets_met"] = {
        "load_speedup": r["load_speedup"] >= TARGETS["load_speedup"],
        "peak_rss_ratio": r["peak_rss_ratio"] <= TARGETS["peak_rss_ratio"],
        "write_ratio": r["write_ratio"] <= TARGETS["write_ratio"],
    }

    print(f"VGG16-sized caffemodel: {size:,} bytes ({mib:.1f} MiB); cache: {figures['cache']}")
    print(f"best of {args.repeat}; peak = VmHWM of the loading process (imports included)")
    print(f"{'load path':<34}{'load s':>9}{'sum s':>9}{'total s':>9}{'peak MiB':>10}{'x file':>8}")
    rows = [
        ("ours: read_caffemodel + np.sum", ours),
        ("protobuf: Parse + np.array", proto),
        ("raw: f.read()", raw),
    ]
    for label, run in rows:
        peak = run["peak_kib"] / 1024
        print(
            f"{label:<34}{run['load_s']:>9.3f}{run['touch_s']:>9.3f}"
            f"{run['load_s'] + run['touch_s']:>9.3f}{peak:>10.1f}{peak / mib:>8.2f}"
        )
    print(f"{'write path':<34}{'s':>9}{'MiB/s':>9}")
    for label, secs in (("ours: write_caffemodel", min(ours_w)), ("raw: f.write()", min(raw_w))):
        print(f"{label:<34}{secs:>9.3f}{mib / secs:>9.0f}")
    met = figures["targets_met"]
    print(
        f"load speedup vs protobuf (ours incl. sum, protobuf without): {r['load_speedup']:.1f}x"
        f"  target >= {TARGETS['load_speedup']:.0f}x  {'OK' if met['load_speedup'] else 'MISSED'}"
    )
    print(
        f"  same with the sum in both: {r['load_speedup_both_summed']:.1f}x;"
        f" scan only (no sum): {r['scan_only_speedup']:.0f}x"
    )
    print(
        f"our peak RSS / file size: {r['peak_rss_ratio']:.2f}"
        f" ({r['peak_rss_ratio_above_baseline']:.2f} above the interpreter baseline)"
        f"  target <= {TARGETS['peak_rss_ratio']}  {'OK' if met['peak_rss_ratio'] else 'MISSED'};"
        f" protobuf: {r['protobuf_peak_rss_ratio']:.2f}"
    )
    print(
        f"our write / raw write: {r['write_ratio']:.2f}"
        f"  target <= {TARGETS['write_ratio']}  {'OK' if met['write_ratio'] else 'MISSED'}"
    )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0 if all(met.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
