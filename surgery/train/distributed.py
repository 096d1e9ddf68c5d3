"""torchrun / DistributedDataParallel with Caffe's multi-GPU semantics.

``torchrun --nproc_per_node=N -m surgery train SOLVER`` starts N processes; each is a Caffe
solver: it takes ``batch_size`` samples per pass (the data layers deal samples round-robin,
sample ``k`` to rank ``k % N``), the gradients are averaged across processes before the update
(Caffe sums them and scales by ``1/solver_count``), BatchNorm statistics stay per process
(``broadcast_buffers=False``), and rank 0 alone prints, tests and snapshots. NCCL on GPUs,
gloo on CPUs. Across machines: ``torchrun --nnodes=M --node-rank=R --nproc_per_node=N
--rdzv-backend=c10d --rdzv-endpoint=HOST:PORT -m surgery train SOLVER``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

__all__ = ["Dist", "init_from_env", "wrap_ddp", "shutdown"]


@dataclass(frozen=True)
class Dist:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


def init_from_env(device: str | None = None) -> Dist:
    """Join the torchrun job described by the environment (``WORLD_SIZE``, ``RANK``...);
    a single process when there is none."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local % torch.cuda.device_count())
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(rank, world, local)


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` in DistributedDataParallel (gradients averaged; buffers not broadcast)."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" and device.index is not None else None
    return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)


def shutdown() -> None:
    """Leave the process group (when one was joined)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
