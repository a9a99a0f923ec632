"""Multi-process training through torchrun: environment detection, process group, reductions.

torchrun sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; without them the run is a single process and every
helper here is a no-op. The backend is NCCL on CUDA and gloo on CPU (``distributed.backend`` overrides).
Only rank 0 writes files; metrics are reduced as sums (correct predictions, sample counts, loss sums) so that
accuracy is over the whole split, not an average of per-rank averages.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedEnv:
    """Where this process sits: global rank, world size, rank on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect_env() -> DistributedEnv:
    """Read torchrun's environment variables (a single process when they are absent)."""

    def read(name: str, default: int) -> int:
        value = os.environ.get(name)
        try:
            return int(value) if value not in (None, "") else default
        except ValueError:
            raise ValueError(f"environment variable {name}={value!r} must be an integer (set by torchrun)") from None

    world_size = read("WORLD_SIZE", 1)
    rank = read("RANK", 0)
    local_rank = read("LOCAL_RANK", rank)
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world_size}; start multi-process runs with torchrun")
    return DistributedEnv(rank=rank, world_size=world_size, local_rank=local_rank)


def init(env: DistributedEnv, device: torch.device, backend: str = "auto") -> None:
    """Join the process group (no-op for a single process)."""
    if not env.enabled or dist.is_initialized():
        return
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ValueError("distributed.backend=nccl needs --device cuda; use gloo on CPU")
    kwargs: dict[str, Any] = {"backend": backend, "rank": env.rank, "world_size": env.world_size}
    if device.type == "cuda":
        kwargs["device_id"] = device  # binds NCCL to this GPU up front (no guessing in barrier())
    dist.init_process_group(**kwargs)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, env: DistributedEnv) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place (returns it; no-op for one process)."""
    if env.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(value: Any, env: DistributedEnv) -> Any:
    """Rank 0's ``value`` on every rank (e.g. a stop decision made on rank 0)."""
    if not env.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(value: Any, env: DistributedEnv) -> list[Any]:
    """Every rank's ``value``, in rank order, on every rank."""
    if not env.enabled:
        return [value]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, value)
    return out


def barrier(env: DistributedEnv) -> None:
    if env.enabled:
        dist.barrier()


def broadcast_buffers(net: torch.nn.Module, env: DistributedEnv) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    DDP broadcasts buffers at the start of each *training* forward, so after the last step every rank holds the
    running statistics of its own last batch; without this, rank 1 would validate (and a 1-rank resume would
    continue) with statistics that differ from the ones rank 0 saves in ``last.pt``.
    """
    if not env.enabled:
        return
    for buffer in net.buffers():
        dist.broadcast(buffer.data, src=0)


def rank_seed(seed: int, rank: int, epoch: int = 0) -> int:
    """A per-rank seed (dropout masks differ between ranks); rank 0 of epoch 0 keeps ``seed`` itself."""
    return (seed + 1_000_003 * rank + 7_919 * epoch) % (2**63 - 1)
