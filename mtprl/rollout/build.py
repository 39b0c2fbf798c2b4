"""The rollout engine of a run, built from the config: its KV cache planned against the memory the loaded
weights left (:func:`plan_kv_cache`), the native :class:`~mtprl.rollout.engine.Engine` or, with
``rollout.name=vllm``, a :class:`~mtprl.rollout.vllm_engine.VLLMEngine` (:func:`build_engine`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Union

import torch

from mtprl.config.loader import ConfigError
from mtprl.config.schema import MtprlConfig

if TYPE_CHECKING:
    from rich.console import Console

    from mtprl.rollout.engine import Engine
    from mtprl.rollout.kv_cache import KVCachePlan
    from mtprl.rollout.types import SpeculativeConfig
    from mtprl.rollout.vllm_engine import VLLMEngine

# what the trainer generates with: both have generate / generate_with_metrics / release; a VLLMEngine also
# holds_own_weights (pushed by sync_weights) and has a close() that shuts its engine down
RolloutEngine = Union["Engine", "VLLMEngine"]


def packed_copy_bytes(model_config, dtype: torch.dtype) -> int:
    """The engine's packed weight copy (mtprl.model.packed) in `dtype`, counted on the meta device (every packed
    tensor counted as a copy: in the model's own dtype the embedding and head alias its parameters instead)."""
    from mtprl.distributed.weight_sync import stepper_weights
    from mtprl.model import CausalLM
    from mtprl.model.packed import PackedModel

    with torch.device("meta"):
        meta = CausalLM(model_config)
    return sum(t.numel() for t in stepper_weights(PackedModel(meta)).values()) * dtype.itemsize


def plan_kv_cache(model_config, rollout_cfg, max_seq_len: int, device, *, dtype: torch.dtype,
                  free_bytes: int | None = None, speculative: SpeculativeConfig | None = None,
                  reserve_bytes: int = 0) -> KVCachePlan:
    """The rollout engine's KV cache (rows, slots, bytes; nothing allocated) for this config: rows =
    min(rollout.max_num_seqs, what fits the bound), the bound being rollout.gpu_memory_utilization x the free
    memory on CUDA minus reserve_bytes (what the engine and the trainer will still allocate: the packed copy, the
    optimizer's moments before its first step) and rollout.cpu_kv_cache_gb GiB elsewhere. free_bytes: default
    torch.cuda.mem_get_info after emptying the caching allocator (so memory that loading freed counts as free).
    Each row counts its K/V slots and the engine's per-row state and step temporaries (kv_cache.engine_row_bytes).
    A ConfigError naming the key when not one row of max_seq_len (+ speculative slots) fits."""
    from mtprl.rollout.kv_cache import GiB, plan_engine_cache

    r, device = rollout_cfg, torch.device(device)
    if device.type == "cuda":
        if free_bytes is None:
            torch.cuda.empty_cache()  # blocks the allocator keeps from loading are free for the cache
            free_bytes = torch.cuda.mem_get_info(device)[0]
        limit = int(free_bytes * r.gpu_memory_utilization) - reserve_bytes
        key = (f"actor_rollout_ref.rollout.gpu_memory_utilization={r.gpu_memory_utilization} of "
               f"{free_bytes / GiB:.2f} GiB free, less {reserve_bytes / GiB:.2f} GiB the engine's packed weights and "
               "the optimizer will take")
        if limit < 1:
            raise ConfigError(f"{key}: nothing is left for the KV cache; raise gpu_memory_utilization, offload "
                              "(actor.fsdp_config.optimizer_offload) or use more GPUs")
    else:
        limit = int(r.cpu_kv_cache_gb * GiB)
        key = f"actor_rollout_ref.rollout.cpu_kv_cache_gb={r.cpu_kv_cache_gb}"
    try:
        return plan_engine_cache(model_config, speculative, max_seq_len, max_num_seqs=r.max_num_seqs, dtype=dtype,
                                 limit_bytes=limit, limit_name=key)
    except ValueError as e:
        raise ConfigError(f"{e} (max_seq_len = data.max_prompt_length + data.max_response_length = "
                          f"{max_seq_len})") from None


def build_engine(cfg: MtprlConfig, model: torch.nn.Module, *, console: Console | None = None,
                 pending_bytes: Callable[[], int] | None = None) -> RolloutEngine:
    """The rollout engine, its KV cache as plan_kv_cache gives it (one line on the run's console; stderr by
    default, so that a command's stdout stays its output).

    On CUDA the engine computes in the model's compute dtype (``model.dtype``, bf16 by default) whatever the
    weights' dtype: its packed copy, KV cache and activations (an fp32 policy on one GPU would otherwise decode
    in fp32), and the cache bound is measured again each time the engine allocates its cache (the first
    generate call, and the first after ``free_cache_engine`` released it), less the packed copy it is about to
    build and pending_bytes() (what the trainer has yet to allocate then: the optimizer's moments before the
    first step)."""
    from rich.console import Console

    from mtprl.rollout.engine import Engine
    from mtprl.trainer.policy import compute_dtype
    from mtprl.trainer.samples import speculative_config

    r = cfg.actor_rollout_ref.rollout
    if r.name == "vllm":
        from mtprl.rollout.vllm_engine import build_vllm_engine

        return build_vllm_engine(cfg, model, console=console)
    max_seq_len = cfg.data.max_prompt_length + cfg.data.max_response_length
    ref = next(model.parameters())
    spec = speculative_config(cfg)
    cuda = ref.device.type == "cuda"
    dtype = compute_dtype(cfg.actor_rollout_ref.model) if cuda else ref.dtype
    packed = packed_copy_bytes(model.config, dtype) if cuda else 0

    def plan_now() -> KVCachePlan:
        reserve = packed + (pending_bytes() if pending_bytes is not None and cuda else 0)
        return plan_kv_cache(model.config, r, max_seq_len, ref.device, dtype=dtype, speculative=spec,
                             reserve_bytes=reserve)

    plan = plan_now()
    # without chunked prefill, every admitted prompt is prefilled in one forward (the rows bound them; a re-plan may
    # give more rows than the first plan, up to max_num_seqs); the adaptive MTP catch-up is chunked by the key itself
    prefill_tokens = r.max_num_batched_tokens if r.enable_chunked_prefill else r.max_num_seqs * max_seq_len
    engine = Engine(model, max_num_seqs=r.max_num_seqs, max_num_batched_tokens=prefill_tokens, max_seq_len=max_seq_len,
                    kv_cache_bytes=plan.limit_bytes, dtype=dtype,
                    kv_budget=(lambda: plan_now().limit_bytes) if cuda else None,
                    catch_up_tokens=r.max_num_batched_tokens)
    line = f"rollout: {plan.describe()} (actor_rollout_ref.rollout.max_num_seqs={r.max_num_seqs})"
    (console or Console(stderr=True)).print(line, highlight=False)
    return engine
