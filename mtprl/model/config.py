"""ModelConfig: the architecture of a decoder trunk (Qwen2 / Llama / Qwen3 / MiMo) plus D MTP layers.

One dataclass, every default here once. `from_hf_dict` / `to_hf_dict` (in `hf_io.config_map`) translate
to and from an HF `config.json`; fields of the HF file that the architecture does not need are kept
verbatim in `hf_extra` so that a save writes them back.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

MODEL_TYPES = ("qwen2", "llama", "qwen3", "mimo")
ROPE_TYPES = ("llama3", "linear")
_ROPE_REQUIRED_KEYS = {
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "linear": ("factor",),
}


@dataclass
class ModelConfig:
    """Architecture of a causal LM with optional MTP layers (see SPEC §2.2, §5).

    model_type: "qwen2" | "llama" | "qwen3" | "mimo" (mimo = qwen2 trunk + MTP layers, HF names of MiMo).
    head_dim: per-head width; None -> hidden_size // num_attention_heads.
    rope_scaling: None, or {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
        "original_max_position_embeddings"} or {"rope_type": "linear", "factor"}; anything else is a ValueError.
    attention_bias: bias on the q/k/v projections (Qwen2 and MiMo always have it).
    attention_out_bias: bias on the o projection (Llama / Qwen3 with `attention_bias: true` in HF).
    qk_norm: RMSNorm over head_dim on q and k before RoPE (Qwen3).
    num_mtp_layers: D, the number of MTP layers (HF field `num_nextn_predict_layers`).
    hf_extra: HF config.json fields we do not interpret (hidden_act, use_cache, auto_map, ...), written back on save.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    attention_out_bias: bool = False
    qk_norm: bool = False
    num_mtp_layers: int = 0
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    architectures: list[str] | None = None
    hf_extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type={self.model_type!r} is not supported; use one of {MODEL_TYPES}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.num_mtp_layers < 0:
            raise ValueError(f"num_mtp_layers must be >= 0, got {self.num_mtp_layers}")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads} (grouped-query attention)")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                f"{self.num_attention_heads}; set head_dim explicitly")
        if self.resolved_head_dim % 2 != 0:
            raise ValueError(f"head_dim must be even for RoPE, got {self.resolved_head_dim}")
        check_rope_scaling(self.rope_scaling)

    @property
    def resolved_head_dim(self) -> int:
        """head_dim, or hidden_size // num_attention_heads when head_dim is None."""
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def tiny(cls, **overrides: Any) -> "ModelConfig":
        """A tiny MiMo-style config for tests: qwen2 trunk with qkv bias, 2 layers, 2 MTP layers, vocab 128."""
        base: dict[str, Any] = dict(
            model_type="mimo", vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0,
            max_position_embeddings=256, tie_word_embeddings=False, attention_bias=True, num_mtp_layers=2,
        )
        base.update(overrides)
        return cls(**base)


def check_rope_scaling(rope_scaling: dict | None) -> None:
    """Raise ValueError unless rope_scaling is None or a complete llama3 / linear spec."""
    if rope_scaling is None:
        return
    if not isinstance(rope_scaling, dict):
        raise ValueError(f"rope_scaling must be a dict or None, got {type(rope_scaling).__name__}")
    rope_type = rope_scaling.get("rope_type")
    if rope_type not in ROPE_TYPES:
        raise ValueError(
            f"rope_scaling rope_type={rope_type!r} is not supported; supported: {ROPE_TYPES} "
            "(or rope_scaling=None for plain RoPE)")
    missing = [k for k in _ROPE_REQUIRED_KEYS[rope_type] if k not in rope_scaling]
    if missing:
        raise ValueError(f"rope_scaling of type {rope_type!r} is missing keys {missing}")
