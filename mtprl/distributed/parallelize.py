"""FSDP2 applied to a plain :class:`~mtprl.model.causal_lm.CausalLM` from outside the model.

One FSDP unit per trunk block, one per MTP layer, and the root (embedding, final norm, untied head):
torchtitan's layout for a decoder. Each unit all-gathers its parameters just before its forward and
frees them after; gradients are reduce-scattered per unit during backward.

Gradient reduction. FSDP averages gradients over ranks by default; mtprl's losses are already
normalised by the *global* token / sequence counts of the mini-batch (each rank's loss is its share
of the global loss), so the right reduction is a plain sum: ``set_gradient_divide_factor(1)``. With
that, N ranks produce the gradient one process computes on the whole mini-batch.

Mixed precision: parameters are kept and updated in fp32; forward/backward run in
``actor_rollout_ref.model.dtype`` and gradients are reduced in fp32 (one process gets the same split from
bf16 autocast: ``mtprl.trainer.policy``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard

from mtprl.distributed.env import DistEnv


def apply_fsdp(model: nn.Module, env: DistEnv, *, compute_dtype: torch.dtype = torch.float32,
               offload: bool = False, reshard_after_forward: bool = True) -> nn.Module:
    """Shard ``model`` in place over all ranks of ``env`` (1-D data-parallel mesh) and return it.

    compute_dtype: the forward/backward dtype (bf16 on CUDA when the config asks; fp32 keeps exact
        parity with a single process). offload: parameters, gradients and optimizer state live on the
        CPU between uses (FSDP2's CPUOffloadPolicy, pinned memory on CUDA; the trainer applies it on CUDA
        only, where it frees GPU memory; tests run the same path on CPU).
    """
    mesh = init_device_mesh(env.device.type, (env.world_size,), mesh_dim_names=("dp",))
    mp = None
    if compute_dtype != torch.float32:
        mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    kwargs = dict(mesh=mesh, reshard_after_forward=reshard_after_forward)
    if mp is not None:
        kwargs["mp_policy"] = mp
    if offload:
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=env.device.type == "cuda")
    for block in list(model.layers) + list(model.mtp_layers):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)  # losses carry the global normalisers: sum, do not average
            module.set_force_sum_reduction_for_comms(True)  # plain SUM collectives (gloo has no PREMUL_SUM)
    return model


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and persistent buffer as a full (unsharded) tensor; a collective on every rank."""
    out = {}
    for name, t in model.state_dict().items():
        out[name] = t.full_tensor() if hasattr(t, "full_tensor") else t
    return out
