"""Training-step cost of ``surgery.train.Trainer`` against a hand-written PyTorch loop.

Both run the same ``GraphModule`` (the Trainer's own TRAIN net) on the same batches held in
memory; the hand-written loop is ``torch.optim.SGD(foreach=True)`` with momentum and weight
decay: ``zero_grad; out = model(x, y); out["total_loss"].backward(); opt.step()``. The
Trainer adds Caffe's loop: the lr policy, the loss read back for display/NaN checks, Caffe's
SGD update. Prints ms/iteration for each and the ratio (issue 10: <= 1.05 on CPU).

    python tools/bench_train.py [--iters 60] [--batch 64] [--threads 2] [--repeats 5]

GPU (GoogLeNet images/s at batch 64 with bf16 and channels_last) is unmeasured here: no GPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from surgery.train import Trainer  # noqa: E402

NET = """name: "benchnet"
layer { name: "data" type: "MemoryData" top: "data" top: "label"
  memory_data_param { batch_size: BATCH channels: 3 height: 32 width: 32 } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 32 kernel_size: 5 pad: 2 weight_filler { type: "xavier" } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
  convolution_param { num_output: 64 kernel_size: 5 pad: 2 weight_filler { type: "xavier" } } }
layer { name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }
layer { name: "pool2" type: "Pooling" bottom: "conv2" top: "pool2"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "ip1" type: "InnerProduct" bottom: "pool2" top: "ip1"
  param { lr_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
  inner_product_param { num_output: 256 weight_filler { type: "xavier" } } }
layer { name: "relu3" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  inner_product_param { num_output: 10 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=60)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    batches = [(torch.from_numpy(rng.standard_normal((args.batch, 3, 32, 32), np.float32)),
                torch.from_numpy(rng.integers(0, 10, args.batch).astype(np.float32)))
               for _ in range(8)]
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "net.prototxt").write_text(NET.replace("BATCH", str(args.batch)))
        (d / "solver.prototxt").write_text(
            f'net: "{d / "net.prototxt"}"\nbase_lr: 0.01\nlr_policy: "step"\nstepsize: 1000\n'
            f"gamma: 0.1\nmomentum: 0.9\nweight_decay: 0.0005\nmax_iter: 100000\n"
            f"display: 0\nsnapshot_after_train: false\nsolver_mode: CPU\n")
        trainer = Trainer(d / "solver.prototxt", device="cpu", datasets={"data": batches},
                          log=lambda s: None)
        model = trainer.model
        groups = [{"params": g["params"], "lr": 0.01 * g["lr_mult"],
                   "weight_decay": 0.0005 * g["decay_mult"]}
                  for g in trainer.optimizer.param_groups]
        opt = torch.optim.SGD(groups, lr=0.01, momentum=0.9, foreach=True)
        key = model.total_loss_key

        def hand(n: int) -> None:
            for i in range(n):
                x, y = batches[i % len(batches)]
                opt.zero_grad(set_to_none=True)
                out = model(x, y)
                out[key].backward()
                opt.step()

        wall: dict[str, list[float]] = {"ours": [], "hand": []}
        cpu: dict[str, list[float]] = {"ours": [], "hand": []}
        trainer.step(5)
        hand(5)
        for r in range(args.repeats):  # interleaved, alternating who goes first
            order = [("ours", trainer.step), ("hand", hand)]
            for name, fn in order if r % 2 == 0 else order[::-1]:
                t0, c0 = time.perf_counter(), time.process_time()
                fn(args.iters)
                wall[name].append((time.perf_counter() - t0) / args.iters)
                cpu[name].append((time.process_time() - c0) / args.iters)
    print(f"batch {args.batch}, {args.threads} threads, {args.iters} iterations x "
          f"{args.repeats} (median), ms/iter: wall / CPU time")
    for name, what in (("ours", "surgery Trainer      "), ("hand", "hand-written SGD loop")):
        print(f"{what}: {statistics.median(wall[name]) * 1e3:8.2f} / "
              f"{statistics.median(cpu[name]) * 1e3:8.2f}")
    rw = statistics.median(wall["ours"]) / statistics.median(wall["hand"])
    rc = statistics.median(cpu["ours"]) / statistics.median(cpu["hand"])
    print(f"ratio                : {rw:8.3f} / {rc:8.3f}  (goal <= 1.05)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
