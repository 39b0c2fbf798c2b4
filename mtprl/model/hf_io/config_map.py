"""HF config.json <-> ModelConfig.

Reads both RoPE spellings: the classic `rope_theta` + `rope_scaling` (Qwen2.5, MiMo, Llama-3.x hub files)
and transformers-5's `rope_parameters`. Writes the classic spelling, which transformers 4.x and 5.x both read.
Fields we do not interpret go to ModelConfig.hf_extra and are written back verbatim; the dtype field is
derived from the saved tensors instead.
"""

from __future__ import annotations

from typing import Any

from mtprl.model.config import MODEL_TYPES, ModelConfig

# HF field -> ModelConfig field, copied as they are
_DIRECT_FIELDS = {
    "vocab_size": "vocab_size", "hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
    "num_hidden_layers": "num_hidden_layers", "num_attention_heads": "num_attention_heads",
    "rms_norm_eps": "rms_norm_eps", "max_position_embeddings": "max_position_embeddings",
    "tie_word_embeddings": "tie_word_embeddings", "initializer_range": "initializer_range",
    "bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id", "pad_token_id": "pad_token_id",
    "architectures": "architectures",
}
# consumed on load, regenerated on save
_DERIVED_FIELDS = ("model_type", "num_key_value_heads", "head_dim", "rope_theta", "rope_scaling", "rope_parameters",
                   "attention_bias", "mlp_bias", "num_nextn_predict_layers", "torch_dtype", "dtype")
_DEFAULT_ARCHITECTURE = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM",
                         "mimo": "MiMoForCausalLM"}


def _read_rope(hf: dict[str, Any]) -> tuple[float, dict | None]:
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and params:
        if any(isinstance(v, dict) for v in params.values()):
            raise ValueError("per-layer-type rope_parameters are not supported (only one global RoPE spec)")
        theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = hf.get("rope_theta", 10000.0)
        scaling = dict(hf["rope_scaling"]) if hf.get("rope_scaling") else {}
    if "type" in scaling:  # old spelling
        scaling.setdefault("rope_type", scaling.pop("type"))
    if float(scaling.pop("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported")
    if scaling.get("rope_type", "default") == "default":
        extra = set(scaling) - {"rope_type"}
        if extra:
            raise ValueError(f"rope_scaling of type 'default' has unexpected keys {sorted(extra)}")
        return float(theta), None
    if scaling["rope_type"] == "llama3":  # HF fills the pre-training length from max_position_embeddings
        scaling.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))
    return float(theta), scaling


def _check_supported(hf: dict[str, Any], model_type: str) -> None:
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act={act!r} is not supported (SwiGLU with silu only)")
    if hf.get("use_sliding_window"):
        raise ValueError("use_sliding_window=true is not supported; set it to false in config.json if every "
                         "sequence fits in the window")
    if hf.get("mlp_bias"):
        raise ValueError("mlp_bias=true is not supported")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type={model_type!r} is not supported; supported: {MODEL_TYPES}")


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """ModelConfig from the dict of an HF config.json (ValueError for unsupported architectures)."""
    model_type = hf.get("model_type")
    _check_supported(hf, model_type)
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in hf]
    if missing:
        raise ValueError(f"config.json lacks required fields {missing}")
    theta, scaling = _read_rope(hf)
    kwargs = {ours: hf[key] for key, ours in _DIRECT_FIELDS.items() if key in hf}
    bias = bool(hf.get("attention_bias", False))
    head_dim = hf.get("head_dim")
    if model_type == "qwen3" and head_dim is None:
        head_dim = 128  # transformers' Qwen3Config default
    kwargs.update(
        model_type=model_type,
        num_key_value_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=head_dim,
        rope_theta=theta,
        rope_scaling=scaling,
        # Qwen2 / MiMo always have q/k/v bias and no o bias; Llama / Qwen3 put attention_bias on all four
        attention_bias=True if model_type in ("qwen2", "mimo") else bias,
        attention_out_bias=False if model_type in ("qwen2", "mimo") else bias,
        qk_norm=model_type == "qwen3",
        num_mtp_layers=int(hf.get("num_nextn_predict_layers") or 0),
        hf_extra={k: v for k, v in hf.items() if k not in _DIRECT_FIELDS and k not in _DERIVED_FIELDS},
    )
    return ModelConfig(**kwargs)


def config_to_hf(config: ModelConfig, *, dtype_name: str) -> dict[str, Any]:
    """The config.json dict for `config`; dtype_name ("float32", "bfloat16", ...) describes the saved tensors."""
    hf: dict[str, Any] = dict(config.hf_extra)
    for key, ours in _DIRECT_FIELDS.items():
        hf[key] = getattr(config, ours)
    if hf["architectures"] is None:
        hf["architectures"] = [_DEFAULT_ARCHITECTURE[config.model_type]]
    hf.update(
        model_type=config.model_type,
        num_key_value_heads=config.num_key_value_heads,
        rope_theta=config.rope_theta,
        rope_scaling=None if config.rope_scaling is None else dict(config.rope_scaling),
        torch_dtype=dtype_name,
    )
    if config.head_dim is not None:
        hf["head_dim"] = config.head_dim
    if config.model_type not in ("qwen2", "mimo"):
        if config.attention_bias != config.attention_out_bias:
            raise ValueError(f"{config.model_type} in HF has one attention_bias for q/k/v/o; got attention_bias="
                             f"{config.attention_bias}, attention_out_bias={config.attention_out_bias}")
        hf["attention_bias"] = config.attention_bias
    elif not config.attention_bias or config.attention_out_bias:
        raise ValueError(f"{config.model_type} in HF always has q/k/v bias and no o bias; this config cannot be saved "
                         f"as {config.model_type}")
    else:
        hf["attention_bias"] = True  # MiMo's config has it; harmless for qwen2
    if config.qk_norm != (config.model_type == "qwen3"):
        raise ValueError(f"qk_norm={config.qk_norm} cannot be expressed by model_type={config.model_type!r} "
                         "(only qwen3 has q/k norm)")
    if config.num_mtp_layers > 0 or config.model_type == "mimo":
        hf["num_nextn_predict_layers"] = config.num_mtp_layers
    return hf
