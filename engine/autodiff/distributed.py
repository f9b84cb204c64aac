"""Ranks of a ``torchrun`` job: which share of the training set this process computes, and the
collectives that combine the shares.

``torchrun --nproc_per_node N -m engine.cli attribute …`` starts N processes with ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` in their environment. Featurization and curvature fitting split
the training set over the ranks (feature chunks round-robin, curvature batches round-robin); each
rank writes its own chunks of the shared on-disk store, and Gram matrices, curvature factors and
per-example vectors are summed with an all-reduce, so every rank holds the same fitted state.
Rank 0 alone scores and writes the run record. Outside torchrun every helper is the identity
(rank 0 of 1), so single-process code paths are unchanged.

Backend: NCCL when the job runs on CUDA, else gloo (the CPU tests run 2 gloo processes).
"""
from __future__ import annotations

import datetime
import os
from typing import Sequence, TypeVar

import numpy as np
import torch
import torch.distributed as dist

T = TypeVar("T")
# a rank that waits longer than this for the others (one died without torchrun noticing) gives up
TIMEOUT = datetime.timedelta(minutes=int(os.environ.get("PROPONENT_DIST_TIMEOUT_MIN", "30")))


def launched_by_torchrun() -> bool:
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def start(device: str) -> bool:
    """Join the process group torchrun describes (no-op outside torchrun or when joined).

    On CUDA each rank takes the GPU of its ``LOCAL_RANK``, so ``"cuda"`` means that GPU."""
    if not launched_by_torchrun() or active():
        return active()
    cuda = device.startswith("cuda") and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    return True


def stop() -> None:
    if active():
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def local_world_size() -> int:
    """Processes of this job on this host (they share its cores)."""
    if not active():
        return 1
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def is_main() -> bool:
    return rank() == 0


def process_rank() -> int:
    """This process's rank as torchrun numbered it, whether or not it is still in the group (a
    method that does not shard leaves the group, and rank 0 runs it alone)."""
    try:
        return int(os.environ.get("RANK", "0")) if launched_by_torchrun() else 0
    except ValueError:
        return 0


def is_main_process() -> bool:
    return process_rank() == 0


def my_share(items: Sequence[T]) -> list[T]:
    """This rank's items, round-robin (balanced when items are equal-sized chunks or batches)."""
    return list(items)[rank()::world_size()]


def owns(i: int) -> bool:
    """Whether item ``i`` of a round-robin split is this rank's."""
    return i % world_size() == rank()


def barrier() -> None:
    if active():
        dist.barrier()


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def sum_tensor_(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place (every rank ends with the total)."""
    if not active():
        return t
    dev = _collective_device()
    buf = t if t.device == dev and t.is_contiguous() else t.detach().to(dev).contiguous()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    if buf is not t:
        t.copy_(buf)
    return t


def min_int(value: int) -> int:
    """The smallest ``value`` over ranks: sizes that decide how rows are split (round-robin batches)
    must be the same on every rank, or rows are covered twice or not at all."""
    if not active():
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def sum_array(a: np.ndarray) -> np.ndarray:
    """The sum of ``a`` over ranks (a new array; ``a`` is left as it was)."""
    if not active():
        return a
    t = torch.from_numpy(np.ascontiguousarray(a).copy())
    return sum_tensor_(t).numpy()


def sum_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum every tensor of the dict over ranks, in place; returns the dict."""
    for t in tensors.values():
        sum_tensor_(t)
    return tensors


def agree(value: T) -> T:
    """Rank 0's ``value`` on every rank: decisions that gate collectives (is this factor already
    on disk?) must be the same everywhere, or ranks wait for each other forever."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def describe() -> dict:
    return {"world_size": world_size(), "backend": dist.get_backend() if active() else None}


def per_rank(value: float) -> list[float]:
    """``value`` of every rank, in rank order, on every rank."""
    v = np.zeros(world_size())
    v[rank()] = value
    return [float(x) if x != int(x) else int(x) for x in sum_array(v)]
