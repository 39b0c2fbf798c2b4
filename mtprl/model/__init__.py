"""mtprl.model: decoder trunk (Qwen2 / Llama / Qwen3 / MiMo) + MTP layers, HF checkpoints in and out.

    model = mtprl.model.from_pretrained(path, dtype=torch.float32, device="cpu", num_mtp_layers=None)
    out = model(input_ids)                # .logits [B,T,V], .hidden_states [B,T,H], .mtp_logits D x [B,T,V]
    out = model(input_ids, scoring=TokenScoring(mask))  # .token_logprobs [B,T], no [B,T,V] tensor (model/head.py)
    logits, hidden = model.forward_step(input_ids, position_ids, cache_slots, model.new_kv_cache(B, S))
    model.save_pretrained(path)
"""

from mtprl.model.causal_lm import CausalLM, CausalLMOutput, default_position_ids
from mtprl.model.config import ModelConfig
from mtprl.model.head import TokenScoring
from mtprl.model.kv_cache import KVCache
from mtprl.model.mtp import MTPLayer, mtp_loss, mtp_loss_from_scores, mtp_token_scores, mtp_valid_counts


def tiny_config(**overrides) -> ModelConfig:
    """ModelConfig.tiny(**overrides): a tiny MiMo-style config for tests."""
    return ModelConfig.tiny(**overrides)


def from_pretrained(path, *, dtype=None, device="cpu", num_mtp_layers=None) -> CausalLM:
    """Load an HF directory (qwen2 / llama / qwen3 / mimo); see mtprl.model.hf_io.checkpoint.from_pretrained."""
    import torch

    from mtprl.model.hf_io.checkpoint import from_pretrained as _from_pretrained

    return _from_pretrained(path, dtype=torch.float32 if dtype is None else dtype, device=device,
                            num_mtp_layers=num_mtp_layers)


__all__ = ["CausalLM", "CausalLMOutput", "KVCache", "MTPLayer", "ModelConfig", "TokenScoring", "default_position_ids",
           "from_pretrained", "mtp_loss", "mtp_loss_from_scores", "mtp_token_scores", "mtp_valid_counts", "tiny_config"]
