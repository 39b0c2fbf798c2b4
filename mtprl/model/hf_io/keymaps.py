"""Parameter-name maps between CausalLM and HF checkpoints, as data.

Templates use `{i}` (trunk layer), `{k}` (MTP layer) and `{p}` (a block parameter, one of BLOCK_PARAMS).
Our names are on the left, HF names on the right. MTP layers use MiMo's names (SPEC §5).

DeepSeek-V3-style MTP names (`model.layers.{N}.{enorm,hnorm,eh_proj,shared_head.norm}`, [emb ; hidden]
order) are NOT mapped: a DeepSeek-V3 trunk (MLA attention, MoE) cannot be built by this package, so such a
map would have no checkpoint to serve.
"""

from __future__ import annotations

import re

# parameters of one DecoderBlock (same names on both sides; biases / q,k norms exist only in some configs)
BLOCK_PARAMS = (
    "input_layernorm.weight",
    "self_attn.q_proj.weight", "self_attn.q_proj.bias",
    "self_attn.k_proj.weight", "self_attn.k_proj.bias",
    "self_attn.v_proj.weight", "self_attn.v_proj.bias",
    "self_attn.o_proj.weight", "self_attn.o_proj.bias",
    "self_attn.q_norm.weight", "self_attn.k_norm.weight",
    "post_attention_layernorm.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
)

TRUNK_KEY_MAP = {
    "embed_tokens.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
    "layers.{i}.{p}": "model.layers.{i}.{p}",
}

MIMO_MTP_KEY_MAP = {
    "mtp_layers.{k}.hidden_layernorm.weight": "model.mtp_layers.{k}.hidden_layernorm.weight",
    "mtp_layers.{k}.token_layernorm.weight": "model.mtp_layers.{k}.token_layernorm.weight",
    "mtp_layers.{k}.input_proj.weight": "model.mtp_layers.{k}.input_proj.weight",
    "mtp_layers.{k}.final_layernorm.weight": "model.mtp_layers.{k}.final_layernorm.weight",
    "mtp_layers.{k}.block.{p}": "model.mtp_layers.{k}.{p}",
}

KEY_MAP = {**TRUNK_KEY_MAP, **MIMO_MTP_KEY_MAP}

# HF keys that carry no weights we need (old checkpoints stored RoPE tables)
IGNORED_HF_KEYS = re.compile(r".*rotary_emb\.inv_freq$")

_BLOCK_ALT = "|".join(re.escape(p) for p in BLOCK_PARAMS)


def _compile(template: str) -> re.Pattern:
    pattern = re.escape(template)
    pattern = pattern.replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{k\}", r"(?P<k>\d+)")
    pattern = pattern.replace(r"\{p\}", f"(?P<p>{_BLOCK_ALT})")
    return re.compile(f"^{pattern}$")


_OURS_TO_HF = [(_compile(ours), hf) for ours, hf in KEY_MAP.items()]
_HF_TO_OURS = [(_compile(hf), ours) for ours, hf in KEY_MAP.items()]


def _translate(name: str, table: list[tuple[re.Pattern, str]]) -> str | None:
    for pattern, template in table:
        match = pattern.match(name)
        if match:
            return template.format(**match.groupdict())
    return None


def to_hf_name(name: str) -> str:
    """Our parameter name -> HF checkpoint key (ValueError if unmapped)."""
    hf = _translate(name, _OURS_TO_HF)
    if hf is None:
        raise ValueError(f"parameter {name!r} has no HF name in mtprl.model.hf_io.keymaps.KEY_MAP")
    return hf


def from_hf_name(hf_name: str) -> str | None:
    """HF checkpoint key -> our parameter name; None if the key is not one we know."""
    return _translate(hf_name, _HF_TO_OURS)
