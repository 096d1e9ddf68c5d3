"""CLI verb ``surgery train``: ``caffe train`` over the torch export.

``surgery train SOLVER [--weights A,B] [--snapshot S] [--device D] [--amp bf16|fp16]
[--compile] [--channels-last] [--max-iter N] [--log-json FILE]``; under ``torchrun`` every
process runs it and rank 0 prints, tests and snapshots. SIGINT/SIGTERM snapshot, then exit
(Caffe's ``-sigint_effect snapshot``). torch is imported only when the verb runs.
"""

from __future__ import annotations

import argparse
import signal
from typing import Any

from . import CliError

__all__ = ["register", "cmd_train"]


def cmd_train(args: argparse.Namespace) -> int:
    """``surgery train``."""
    if args.snapshot and args.weights:
        raise CliError("give --snapshot to resume or --weights to fine-tune, not both "
                       "(as caffe train)")
    from ..train.distributed import init_from_env, shutdown
    from ..train.loop import Trainer

    dist = init_from_env(args.device)
    trainer = Trainer(args.solver, weights=args.weights, device=args.device, amp=args.amp,
                      compile=args.compile, channels_last=args.channels_last,
                      max_iter=args.max_iter, log_json=args.log_json, workers=args.workers,
                      rank=dist.rank, world_size=dist.world_size)
    if args.snapshot:
        trainer.restore(args.snapshot)

    def on_signal(signum: int, _frame: Any) -> None:
        trainer.log(f"{signal.Signals(signum).name} received: snapshot, then stop")
        trainer.stop_requested = "snapshot"
        signal.signal(signum, signal.SIG_DFL)  # a second signal ends at once

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        trainer.solve()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        trainer.close()
        shutdown()
    return 0


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def register(sub: Any) -> None:
    """Add ``train`` to the ``surgery`` parser."""
    p = sub.add_parser("train", help="train with Caffe's solver semantics (caffe train)")
    p.add_argument("solver", help="SOLVER.prototxt")
    p.add_argument("--weights", help="A.caffemodel[,B.caffemodel]: copy weights by layer name "
                   "before training (later files override)")
    p.add_argument("--snapshot", help="S.solverstate: resume (Caffe's or ours)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: the solver's solver_mode "
                   "and device_id when CUDA is available, else cpu)")
    p.add_argument("--amp", choices=["bf16", "fp16"], help="mixed precision (autocast)")
    p.add_argument("--compile", action="store_true", help="torch.compile the nets")
    p.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    p.add_argument("--max-iter", type=_positive, help="override the solver's max_iter")
    p.add_argument("--log-json", metavar="FILE",
                   help="append one JSON object per display and per test to FILE")
    p.add_argument("--workers", type=int, default=0,
                   help="data-loading worker processes per data layer (default 0)")
    p.set_defaults(func=cmd_train)
