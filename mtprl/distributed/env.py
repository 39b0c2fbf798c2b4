"""The process group of a run and the few collectives the loop calls.

Ranks are started by Ray (:mod:`mtprl.distributed.ray_launcher`) or by ``torchrun``; both leave the
standard variables ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` in the
environment and every rank runs the same loop (SPMD). A single process has world size 1 and every
collective below is the identity, so the loop has one code path for 1 and N processes.

Every collective carries the process group's timeout (``trainer.collective_timeout_s``): a rank whose
peer died gets an error instead of waiting forever (gloo and nccl both honour it).
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


# one process group, two back-ends by tensor device (torchtitan's choice for FSDP2 CPU offload)
CUDA_BACKEND = "cuda:nccl,cpu:gloo"


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: ``rank`` of ``world_size`` (``local_rank`` on its node), the device
    its model lives on, and the back-end of its process group (None: single process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    # ----- collectives (the identity on one process) ------------------------------------------------------
    def all_reduce(self, values: list[float], op: str = "sum") -> list[float]:
        """Element-wise sum / max / min of a list of floats over ranks (float64 on the wire)."""
        if not self.distributed or not values:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
        return t.tolist()

    def all_gather_object(self, obj: Any) -> list[Any]:
        """``obj`` of every rank, in rank order (pickled; for small host-side things like samples)."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        if not self.distributed:
            return obj
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")


def world_from_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the launcher's environment; (0, 1, 0) when there is none."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def init_distributed(device: str, *, timeout_s: float, expected_world_size: int | None = None) -> DistEnv:
    """Join the process group the launcher set up (or return a single-process :class:`DistEnv`).

    ``device``: ``trainer.device`` resolved ("cpu" -> gloo; "cuda" -> one GPU per local rank, nccl for CUDA
    tensors and gloo for CPU ones).
    ``expected_world_size``: ``trainer.nnodes x trainer.n_gpus_per_node``; a launcher that started a
    different number of ranks is an error naming both.
    """
    rank, world, local_rank = world_from_env()
    if expected_world_size is not None and world > 1 and world != expected_world_size:
        raise RuntimeError(f"the launcher started {world} ranks but trainer.nnodes x trainer.n_gpus_per_node = "
                           f"{expected_world_size}; make them agree")
    if world == 1:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", 0)
        return DistEnv(device=dev)
    if device.startswith("cuda"):
        # torchrun: every GPU of the node is visible, rank i takes GPU i; Ray: each worker sees only the GPU of
        # its bundle (CUDA_VISIBLE_DEVICES), which is then device 0
        index = local_rank % max(torch.cuda.device_count(), 1)
        torch.cuda.set_device(index)
        # nccl for CUDA tensors, gloo for CPU ones: with fsdp_config.param_offload the shards, their gradients
        # (the grad norm's reduction) and resume's state live on the CPU, and nccl alone has no CPU back-end
        dev, backend = torch.device("cuda", index), CUDA_BACKEND
    else:
        dev, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=dev, backend=backend)


def destroy_distributed() -> None:
    """Leave the process group; a barrier first, so no rank tears down its communication threads while a
    peer is still in a collective with it (gloo aborts the process then)."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def object_nbytes(obj: Any) -> int:
    """Pickled size of ``obj`` (what all_gather_object moves per rank)."""
    return len(pickle.dumps(obj))
