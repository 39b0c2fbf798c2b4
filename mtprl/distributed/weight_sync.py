"""Trainer -> rollout weight sync for colocated ranks (verl's hybrid engine).

Each rank trains an FSDP2 shard of the policy and generates with a full copy of the weights in its
rollout engine. After every update the full tensor of each parameter, MTP layers included, is
gathered from the shards (one all-gather per size-capped bucket of FSDP2's dim-0 shards, on every
rank; other layouts through ``DTensor.full_tensor()``) and copied into the engine's copy in place, a
bucket at a time so at most ``bucket_bytes`` of gathered tensors are alive at once. In-place copies bump
each parameter's version counter, which is how the engine knows to re-pack its fused weights before the
next generation.

Drafters that silently stopped updating because a sync skipped the MTP parameters were shipped by
verl, vLLM and SGLang; here every parameter of the destination must be written by every sync, or the
sync fails (``tests/distributed`` checks weight identity after each step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from mtprl.metrics.clock import device_clock


@dataclass
class SyncStats:
    seconds: float
    bytes: int  # bytes written into the engine's weights (full tensors)
    num_buckets: int
    num_tensors: int


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _row_sharded(t: torch.Tensor) -> bool:
    """A DTensor sharded along dim 0 over a 1-D mesh (FSDP2's layout): gathered by _gather_rows."""
    from torch.distributed.tensor import DTensor, Shard

    return (isinstance(t, DTensor) and t.device_mesh.ndim == 1 and len(t.placements) == 1
            and isinstance(t.placements[0], Shard) and t.placements[0].dim == 0 and t.dim() >= 1)


def _gather_rows(shards: list[torch.Tensor], dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """The full tensors of dim-0 sharded DTensors (same mesh) in ONE all-gather: every rank packs its local
    rows of each tensor, padded to the chunk size ceil(rows / world) (torch.chunk's split, which FSDP2 and
    Shard(0) use), into one flat buffer in ``dtype`` on ``device`` (the rollout copy's: with
    ``param_offload`` the shards are on the CPU and the bucket moves to the GPU before the gather, so it
    travels over nccl, not gloo); the gathered buffers are cut back into each rank's rows.
    One collective per bucket instead of one per parameter (a ~200-tensor model: ~200 gloo round trips)."""
    mesh = shards[0].device_mesh
    world, group = mesh.size(), mesh.get_group()
    layout, parts = [], []
    for t in shards:
        rows, rest = t.shape[0], tuple(t.shape[1:])
        chunk = -(-rows // world)
        local = t.to_local().detach().to(device=device, dtype=dtype).reshape(-1, *rest)
        padded = local.new_zeros((chunk, *rest))
        padded[: local.shape[0]] = local
        parts.append(padded.reshape(-1))
        layout.append((rows, rest, chunk))
    flat = torch.cat(parts)
    gathered = flat.new_empty(world * flat.numel())
    gather = getattr(torch.distributed, "all_gather_single", None) or torch.distributed.all_gather_into_tensor
    gather(gathered, flat, group=group)  # (all_gather_into_tensor's new name in torch 2.13)
    gathered = gathered.view(world, -1)
    out, offset = [], 0
    for rows, rest, chunk in layout:
        size = chunk * math.prod(rest)
        pieces = [gathered[r, offset: offset + size].view(chunk, *rest)[: max(0, min(chunk, rows - r * chunk))]
                  for r in range(world)]
        out.append(torch.cat(pieces))
        offset += size
    return out


@torch.no_grad()
def sync_weights(src: nn.Module, dst: nn.Module, *, bucket_bytes: int = 512 << 20) -> SyncStats:
    """Copy every parameter of ``src`` (sharded or not) into the same-named parameter of ``dst``.

    Every rank must call this (the gathers are collectives). Raises when the two models do not hold
    the same parameter names and shapes, so a parameter cannot be skipped silently. FSDP2's dim-0 shards of
    a bucket (same mesh, same target dtype: cast before the wire, bf16 travels as bf16) come in one
    all-gather (_gather_rows); any other DTensor layout through its own ``full_tensor()``.
    """
    dst_params = dict(dst.named_parameters())
    device = next(iter(dst_params.values())).device if dst_params else None
    t0 = device_clock(device)
    src_params = list(src.named_parameters())
    missing = set(dst_params) - {n for n, _ in src_params}
    extra = {n for n, _ in src_params} - set(dst_params)
    if missing or extra:
        raise ValueError(f"weight sync: trainer and rollout models differ: missing {sorted(missing)[:4]}, "
                         f"unexpected {sorted(extra)[:4]}")
    bucket: list[tuple[str, torch.Tensor]] = []
    size = nbytes = buckets = 0

    def flush() -> None:
        nonlocal bucket, size, buckets
        fulls: dict[str, torch.Tensor] = {}
        groups: dict[tuple, list[str]] = {}
        for name, p in bucket:
            if _row_sharded(p):
                target = dst_params[name]
                groups.setdefault((id(p.device_mesh), target.dtype, target.device), []).append(name)
            else:
                fulls[name] = _full(p.detach().to(dst_params[name].dtype))  # cast the shard first
        sources = dict(bucket)
        for (_, dtype, device), names in groups.items():
            fulls.update(zip(names, _gather_rows([sources[n] for n in names], dtype, device)))
        for name, _ in bucket:
            target, full = dst_params[name], fulls[name]
            if target.numel() == 0 and full.numel() > 0:  # released by release_weights: allocate again
                target.data = torch.empty(full.shape, dtype=target.dtype, device=target.device)
            if full.shape != target.shape:
                raise ValueError(f"weight sync: {name} has shape {tuple(full.shape)} in the trainer and "
                                 f"{tuple(target.shape)} in the rollout engine")
            target.copy_(full.to(device=target.device))
        buckets += bool(bucket)
        bucket, size = [], 0

    for name, p in src_params:
        target = dst_params[name]
        bucket.append((name, p))
        size += p.numel() * target.element_size()  # the full tensor's bytes (p.numel() of a DTensor is global)
        nbytes += p.numel() * target.element_size()
        if size >= bucket_bytes:
            flush()
    flush()
    return SyncStats(seconds=device_clock(device) - t0, bytes=nbytes, num_buckets=buckets, num_tensors=len(src_params))


@torch.no_grad()
def max_weight_diff(src: nn.Module, dst: nn.Module) -> float:
    """max |src - dst| over all parameters (src may be sharded: a collective). For tests and checks."""
    dst_params = dict(dst.named_parameters())
    worst = 0.0
    for name, p in src.named_parameters():
        worst = max(worst, float((_full(p.detach()).to(dst_params[name]) - dst_params[name]).abs().max()))
    return worst


@torch.no_grad()
def release_weights(model: nn.Module) -> int:
    """Drop the storage of every parameter of ``model`` (the engine's copy, while the trainer updates:
    ``rollout.free_cache_engine``); the next :func:`sync_weights` allocates and fills them again.
    Returns the bytes released."""
    freed = 0
    for p in model.parameters():
        freed += p.numel() * p.element_size()
        p.data = torch.empty(0, dtype=p.dtype, device=p.device)
    return freed


def _flat_tensors(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor reachable through dataclass fields / lists of ``obj`` (a PackedModel's weights)."""
    from dataclasses import fields, is_dataclass

    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    if isinstance(obj, (list, tuple)):
        out = {}
        for i, item in enumerate(obj):
            out.update(_flat_tensors(item, f"{prefix}.{i}"))
        return out
    if is_dataclass(obj):
        out = {}
        for f in fields(obj):
            out.update(_flat_tensors(getattr(obj, f.name), f"{prefix}.{f.name}"))
        return out
    return {}


def stepper_weights(stepper) -> dict[str, torch.Tensor]:
    """The weights an engine decodes and drafts with: a PackedModel's fused trunk and MTP tensors, or a
    plain model's parameters."""
    if isinstance(stepper, nn.Module):
        return {n: p.detach() for n, p in stepper.named_parameters()}
    return {k: v for name in ("blocks", "mtp", "embed", "norm", "head")
            for k, v in _flat_tensors(getattr(stepper, name), name).items()}
