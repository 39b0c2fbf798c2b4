"""Loading the policy straight into FSDP2 shards: no rank ever holds the whole model.

The model is built on the meta device (shapes only), sharded with :func:`apply_fsdp`, given empty storage for
its shards only (on the GPU, or on the CPU under ``param_offload``), and each rank then reads from the
safetensors files just the rows of each tensor that its shard holds (FSDP2 shards every parameter along dim 0
in ``ceil(rows / world)`` chunks, rank order). For MiMo-7B on 8 ranks that is ~3.9 GB of fp32 weights read per
rank, against the whole fp32 model on every GPU (and twice more for the reference and the rollout copy)
before sharding. Fresh MTP layers are derived row range by row range as ``from_pretrained`` derives them
whole (:class:`~mtprl.model.hf_io.checkpoint.CheckpointReader`), so both loads give the same weights.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from mtprl.distributed.env import DistEnv
from mtprl.distributed.parallelize import apply_fsdp

if TYPE_CHECKING:
    from mtprl.config.schema import MtprlConfig


def local_rows(param: torch.Tensor) -> tuple[int, int] | None:
    """[start, stop) of the first dimension that this rank's shard of ``param`` holds; None for a tensor that
    is not sharded along dim 0 (every rank holds all of it)."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(param, DTensor):
        return None
    if param.device_mesh.ndim != 1 or len(param.placements) != 1 or not isinstance(param.placements[0], Shard) \
            or param.placements[0].dim != 0:
        raise NotImplementedError(f"sharded loading reads dim-0 shards on a 1-D mesh, got {param.placements}")
    rows, world, rank = param.shape[0], param.device_mesh.size(), param.device_mesh.get_local_rank()
    chunk = -(-rows // world)
    start = min(rows, rank * chunk)
    return start, min(rows, start + chunk)


def load_sharded_policy(model_cfg, env: DistEnv, *, compute_dtype: torch.dtype = torch.float32,
                        offload: bool = False) -> nn.Module:
    """The policy of ``actor_rollout_ref.model`` (checks and MTP layers as ``mtprl.trainer.policy.load_policy``)
    as an FSDP2 model over all ranks of ``env``, fp32 master weights, each rank's shard read from disk.
    offload: the shards live on the CPU (FSDP2's CPUOffloadPolicy); otherwise on ``env.device``."""
    from mtprl.model import CausalLM
    from mtprl.model.hf_io.checkpoint import CheckpointReader, check_against
    from mtprl.model.trunk import rope_inv_freq
    from mtprl.trainer.policy import apply_gradient_checkpointing, policy_config

    config = policy_config(model_cfg, env.device)
    with torch.device("meta"):
        model = CausalLM(config)
    if model_cfg.enable_gradient_checkpointing:
        apply_gradient_checkpointing(model)
    apply_fsdp(model, env, compute_dtype=compute_dtype, offload=offload)
    model.to_empty(device=torch.device("cpu") if offload else env.device)
    reader = CheckpointReader(model_cfg.path, config)
    try:
        check_against(reader, set(model.state_dict()))
        with torch.no_grad():
            for name, param in model.named_parameters():
                local = param.to_local() if hasattr(param, "to_local") else param
                rows = local_rows(param)
                if rows is not None and local.shape[0] != rows[1] - rows[0]:
                    raise RuntimeError(f"{name}: this rank's shard has {local.shape[0]} rows, expected rows {rows}")
                local.copy_(reader.read(name, rows, dtype=local.dtype, device=local.device))
    finally:
        reader.close()
    model.inv_freq = rope_inv_freq(config).to(env.device)
    model.source_dir = str(reader.path.resolve())
    return model.eval()


def load_sharded_models(cfg: MtprlConfig, env: DistEnv, with_ref: bool
                        ) -> tuple[nn.Module, nn.Module | None, nn.Module]:
    """(policy, reference or None, rollout copy) of a multi-rank run. The policy and the
    reference are built on the meta device, sharded with FSDP2 (fp32 master weights, the forward in the configured
    dtype through FSDP's mixed precision) and each rank reads only its shard from the checkpoint; the rollout
    engine's full copy is read in the configured dtype directly (no fp32 model on the device, no deep copies)."""
    from mtprl.trainer.policy import compute_dtype, load_policy

    model_cfg, fsdp = cfg.actor_rollout_ref.model, cfg.actor_rollout_ref.actor.fsdp_config
    dtype = compute_dtype(model_cfg)
    cuda = env.device.type == "cuda"  # CPU: nothing to offload
    model = load_sharded_policy(model_cfg, env, compute_dtype=dtype,
                                offload=cuda and (fsdp.param_offload or fsdp.optimizer_offload))
    ref_model = None
    if with_ref:
        ref_model = load_sharded_policy(model_cfg, env, compute_dtype=dtype,
                                        offload=cuda and cfg.actor_rollout_ref.ref.fsdp_config.param_offload)
        ref_model.requires_grad_(False)
    rollout_model = load_policy(model_cfg, env.device, dtype=dtype).requires_grad_(False).eval()
    return model, ref_model, rollout_model
