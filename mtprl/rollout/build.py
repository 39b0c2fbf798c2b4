"""The rollout engine of a run, built from the config: its KV cache planned against the memory the loaded
weights left (:func:`plan_kv_cache`), the native :class:`~mtprl.rollout.engine.Engine` or, with
``rollout.name=vllm``, a :class:`~mtprl.rollout.vllm_engine.VLLMEngine` (:func:`build_engine`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Union

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


def plan_kv_cache(model_config, rollout_cfg, max_seq_len: int, device, *, dtype: torch.dtype,
                  free_bytes: int | None = None, speculative: SpeculativeConfig | None = None) -> KVCachePlan:
    """The rollout engine's KV cache (rows, slots, bytes; nothing allocated) for this config: rows =
    min(rollout.max_num_seqs, what fits the bound), the bound being rollout.gpu_memory_utilization x the free
    memory on CUDA (free_bytes; default torch.cuda.mem_get_info, i.e. what the loaded weights left) and
    rollout.cpu_kv_cache_gb GiB elsewhere. MTP layers are counted when speculative (a SpeculativeConfig) is
    given. A ConfigError naming the key when not one row of max_seq_len (+ speculative slots) fits."""
    from mtprl.rollout.engine import cache_slots
    from mtprl.rollout.kv_cache import GiB, plan_cache

    r, device = rollout_cfg, torch.device(device)
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0] if free_bytes is None else free_bytes
        limit = int(free * r.gpu_memory_utilization)
        key = (f"actor_rollout_ref.rollout.gpu_memory_utilization={r.gpu_memory_utilization} of {free / GiB:.2f} GiB "
               "free")
    else:
        limit = int(r.cpu_kv_cache_gb * GiB)
        key = f"actor_rollout_ref.rollout.cpu_kv_cache_gb={r.cpu_kv_cache_gb}"
    try:
        return plan_cache(model_config, max_num_seqs=r.max_num_seqs, num_slots=cache_slots(max_seq_len, speculative),
                          dtype=dtype, with_mtp=speculative is not None, limit_bytes=limit, limit_name=key,
                          with_history=speculative is not None and speculative.adaptive)
    except ValueError as e:
        raise ConfigError(f"{e} (max_seq_len = data.max_prompt_length + data.max_response_length = "
                          f"{max_seq_len})") from None


def build_engine(cfg: MtprlConfig, model: torch.nn.Module, *, console: Console | None = None) -> RolloutEngine:
    """The rollout engine, its KV cache as plan_kv_cache gives it (one line on the run's console; stderr by
    default, so that a command's stdout stays its output)."""
    from rich.console import Console

    from mtprl.rollout.engine import Engine
    from mtprl.trainer.samples import speculative_config

    r = cfg.actor_rollout_ref.rollout
    if r.name == "vllm":
        from mtprl.rollout.vllm_engine import build_vllm_engine

        return build_vllm_engine(cfg, model, console=console)
    max_seq_len = cfg.data.max_prompt_length + cfg.data.max_response_length
    ref = next(model.parameters())
    spec = speculative_config(cfg)
    plan = plan_kv_cache(model.config, r, max_seq_len, ref.device, dtype=ref.dtype, speculative=spec)
    # without chunked prefill, every admitted prompt is prefilled in one forward
    prefill_tokens = r.max_num_batched_tokens if r.enable_chunked_prefill else plan.rows * max_seq_len
    engine = Engine(model, max_num_seqs=r.max_num_seqs, max_num_batched_tokens=prefill_tokens, max_seq_len=max_seq_len,
                    kv_cache_bytes=plan.limit_bytes)
    line = f"rollout: {plan.describe()} (actor_rollout_ref.rollout.max_num_seqs={r.max_num_seqs})"
    (console or Console(stderr=True)).print(line, highlight=False)
    return engine
