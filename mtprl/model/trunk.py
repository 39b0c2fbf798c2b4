"""Decoder trunk building blocks for the Qwen2 / Llama / Qwen3 / MiMo families.

Pre-norm decoder block:  x = x + Attn(RMSNorm(x));  x = x + MLP(RMSNorm(x)),  MLP = down(silu(gate x) * up x).
Attention: grouped-query attention with RoPE (rotate-half convention, as HF), optional q/k/v bias, optional
per-head q/k RMSNorm before RoPE (Qwen3), `F.scaled_dot_product_attention` for the softmax(QK^T/sqrt(Dh))V.

The SAME `Attention.forward` serves both paths (one implementation of the maths):
  * full sequence (training, teacher forcing): K/V come from the input, causal or explicit boolean mask;
  * incremental (rollout): K/V of the new tokens are written into a static `KVCache` at given slots, and the
    queries attend over the cache row under a boolean mask.

Numerics follow HF (RMSNorm in fp32 then cast back before the weight; RoPE cos/sin in fp32 then cast to the
activation dtype), so fp32 logits match `transformers` to ~1e-6 and bf16 runs the same code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mtprl.model.config import ModelConfig, check_rope_scaling
from mtprl.model.kv_cache import KVCache


class RMSNorm(nn.Module):
    """y = w * (x / sqrt(mean(x^2) + eps)), normalisation in fp32 (HF numerics)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [Dh/2] (fp32) for RoPE with optional llama3 / linear scaling (HF formulas)."""
    check_rope_scaling(config.rope_scaling)
    dim = config.resolved_head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":  # positions divided by factor == frequencies divided by factor
        return inv_freq / factor
    # llama3: long wavelengths divided by factor, short kept, smooth interpolation in between
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B,1,T,Dh] for position_ids [B,T], computed in fp32 and cast to `dtype`."""
    freqs = position_ids[..., None].float() * inv_freq.to(position_ids.device, torch.float32)  # [B,T,Dh/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclass
class UniqueTokens:
    """Rows [B,T] computed through M unique tokens [1,M]: each token's projections and MLP run once, attention
    runs per row. unique_index [M]: flat index into B*T of each unique token's own slot; expand_index [B,T]:
    index into M of the token at each slot (slots holding the same token in the same context - a prompt shared
    by the samples of a group - point at one unique token; padding slots at any, their outputs are unused).
    Built by mtprl.trainer.batching.shared_prompt_tokens; the maths per token is unchanged (tested)."""

    unique_index: torch.Tensor
    expand_index: torch.Tensor


@dataclass
class AttnInputs:
    """Everything attention needs besides the hidden states; built once per forward, shared by all layers.

    cos, sin: [B,1,T,Dh] RoPE tables at the tokens' positions.
    mask: None (then `is_causal` decides) or bool [B,1,T,S] - True = query t may attend key s.
    cache: KVCache for the incremental path (None for the full-sequence path);
    cache_rows [B] | None, cache_slots [B,T], kv_len: where to write / how many slots to read (see KVCache).
    rows: UniqueTokens when the hidden states are the [1,M] unique tokens of [B,T] rows (cos, sin then [1,1,M,Dh]
    and mask that of the rows); attention expands q, k, v to the rows and gathers each unique token's output.
    past_kv: (k, v) [B,Hkv,S',Dh] (RoPE applied, from `Attention.key_values`) that the full-sequence path puts
    before its own keys and values (mask then [B,1,T,S'+T]); the recursive MTP depths attend to earlier levels.
    """

    cos: torch.Tensor
    sin: torch.Tensor
    mask: torch.Tensor | None
    is_causal: bool = False
    cache: KVCache | None = None
    cache_rows: torch.Tensor | None = None
    cache_slots: torch.Tensor | None = None
    kv_len: int | None = None
    rows: UniqueTokens | None = None
    past_kv: tuple[torch.Tensor, torch.Tensor] | None = None


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.resolved_head_dim
        h, dq, dkv = config.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(h, dq, bias=config.attention_bias)
        self.k_proj = nn.Linear(h, dkv, bias=config.attention_bias)
        self.v_proj = nn.Linear(h, dkv, bias=config.attention_bias)
        self.o_proj = nn.Linear(dq, h, bias=config.attention_out_bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None

    def _qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x [B,T,H] -> q [B,Hq,T,Dh], k, v [B,Hkv,T,Dh], RoPE applied to q and k."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B,H*,T,Dh]
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin, v

    def key_values(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values [B,Hkv,T,Dh] this attention makes of x [B,T,H] (already input-normed)."""
        return self._qkv(x, cos, sin)[1:]

    def forward(self, x: torch.Tensor, attn: AttnInputs, layer: int) -> torch.Tensor:
        """x [B,T,H] -> [B,T,H]. `layer` indexes attn.cache on the incremental path."""
        b, t, _ = x.shape
        q, k, v = self._qkv(x, attn.cos, attn.sin)
        if attn.past_kv is not None:  # full path: keys / values of earlier inputs first (recursive MTP depths)
            k, v = torch.cat([attn.past_kv[0], k], dim=2), torch.cat([attn.past_kv[1], v], dim=2)
        if attn.cache is not None:  # incremental: keys/values become the whole cache row [B,Hkv,S,Dh]
            k, v = attn.cache.write_and_read(layer, k, v, attn.cache_rows, attn.cache_slots, attn.kv_len)
            k, v = k.to(q.dtype), v.to(q.dtype)
        if attn.rows is not None:  # unique tokens [1,M] -> the rows [R,T] for attention, and back
            q, k, v = (_to_rows(z, attn.rows.expand_index) for z in (q, k, v))
            out = self._sdpa(q, k, v, attn).transpose(1, 2)  # [R,T,Hq,Dh]
            out = out.reshape(-1, self.num_heads * self.head_dim)[attn.rows.unique_index][None]  # [1,M,Hq*Dh]
            return self.o_proj(out)
        out = self._sdpa(q, k, v, attn)  # [B,Hq,T,Dh]
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn: AttnInputs) -> torch.Tensor:
        rep = self.num_heads // self.num_kv_heads
        if attn.mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=attn.is_causal, enable_gqa=rep > 1)
        if rep == 1:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn.mask)
        # GQA under a head-independent mask without copying K/V: fold the `rep` query heads that share a
        # kv head into the query axis: q [B,Hkv,rep*T,Dh], mask [B,1,rep*T,S].
        b, _, t, dh = q.shape
        q_packed = q.reshape(b, self.num_kv_heads, rep * t, dh)
        mask = attn.mask
        mask = mask[:, :, None].expand(mask.shape[0], 1, rep, t, mask.shape[-1]).reshape(mask.shape[0], 1, rep * t, -1)
        out = F.scaled_dot_product_attention(q_packed, k, v, attn_mask=mask)
        return out.view(b, self.num_heads, t, dh)


def _to_rows(z: torch.Tensor, expand_index: torch.Tensor) -> torch.Tensor:
    """[1,H,M,Dh] of unique tokens -> [R,H,T,Dh] of the rows (expand_index [R,T] into M)."""
    return z[0].transpose(0, 1)[expand_index].transpose(1, 2)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderBlock(nn.Module):
    """Pre-norm transformer block (the trunk's block type; MTP layers reuse it)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, attn: AttnInputs, layer: int) -> torch.Tensor:
        """x [B,T,H] -> [B,T,H]; `layer` is this block's index in attn.cache."""
        x = x + self.self_attn(self.input_layernorm(x), attn, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


def is_right_padded(attention_mask: torch.Tensor) -> bool:
    """Whether every row of attention_mask [B,T] (1 = real token) is its real tokens then padding only."""
    return bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())


def full_attn_inputs(cos: torch.Tensor, sin: torch.Tensor, attention_mask: torch.Tensor | None) -> AttnInputs:
    """AttnInputs for the full-sequence path. attention_mask [B,T] (1 = real token) or None (all real).

    With padding, key s is visible to query t iff s <= t and s is real. Every query also sees itself, so
    padding queries never have an empty softmax (their outputs are garbage but finite, and no real query
    ever attends to them).
    """
    if attention_mask is None or bool(attention_mask.all()):
        return AttnInputs(cos=cos, sin=sin, mask=None, is_causal=True)
    t = attention_mask.shape[1]
    idx = torch.arange(t, device=attention_mask.device)
    causal = idx[None, :] <= idx[:, None]  # [T(query), T(key)]
    mask = causal[None] & attention_mask.bool()[:, None, :]
    mask = mask | torch.eye(t, dtype=torch.bool, device=attention_mask.device)[None]
    return AttnInputs(cos=cos, sin=sin, mask=mask[:, None])


def check_step(cache: KVCache, cache_slots: torch.Tensor, cache_rows: torch.Tensor | None,
               attn_mask: torch.Tensor | None, kv_len: int | None) -> int:
    """Validate an incremental step's cache arguments; returns S, the slots it reads (kv_len or max_seq_len)."""
    b, t = cache_slots.shape
    s = cache.max_seq_len if kv_len is None else kv_len
    if not 0 < s <= cache.max_seq_len:
        raise ValueError(f"kv_len={kv_len} must be in [1, max_seq_len={cache.max_seq_len}]")
    if cache_rows is None and b > cache.num_rows:
        raise ValueError(f"batch of {b} rows but the cache has only {cache.num_rows}; pass cache_rows")
    if cache_rows is not None and cache_rows.shape != (b,):
        raise ValueError(f"cache_rows must have shape [B]={(b,)}, got {tuple(cache_rows.shape)}")
    # bounds are checked on the host only for CPU tensors (a device sync otherwise)
    if cache_slots.device.type == "cpu":
        low, high = (int(x) for x in torch.aminmax(cache_slots))
        if low < 0 or high >= s:
            raise ValueError(f"cache_slots must lie in [0, {s}), got range [{low}, {high}]")
    if attn_mask is not None and attn_mask.shape != (b, t, s):
        raise ValueError(f"attn_mask must have shape [B,T,S]={(b, t, s)}, got {tuple(attn_mask.shape)}")
    return s


def is_prefill(cache_slots: torch.Tensor, attn_mask: torch.Tensor | None, kv_len: int, prefill: bool) -> bool:
    """Whether an incremental step is a prefill: every row's slots are 0..T-1 and it reads those T slots under the
    default mask - plain causal attention over its own tokens, what SDPA's is_causal computes with no mask (on
    CUDA the flash kernel, which takes none). On the CPU the slots are compared on the host; elsewhere that would
    be a host-device sync, and the caller's `prefill` (its promise) says it. prefill=True on a step that is not
    one raises ValueError (the slots checked on the CPU only)."""
    t = cache_slots.shape[1]
    if attn_mask is not None or kv_len != t:
        if prefill:
            raise ValueError(f"prefill=True needs kv_len = T = {t} and no attn_mask (kv_len={kv_len})")
        return False
    if cache_slots.device.type != "cpu":
        return prefill
    first_slots = bool((cache_slots == torch.arange(t)).all())
    if prefill and not first_slots:
        raise ValueError("prefill=True needs cache_slots 0..T-1 in every row")
    return first_slots


def step_mask(cache: KVCache, cache_slots: torch.Tensor, cache_rows: torch.Tensor | None,
              attn_mask: torch.Tensor | None, kv_len: int | None) -> torch.Tensor:
    """Validated boolean mask [B,1,T,S] for the incremental path (True = query may attend key slot).
    Default: key slot <= query slot. The query's own slot is always admitted (a token attends to itself;
    avoids empty softmax rows)."""
    return slot_mask(cache_slots, attn_mask, check_step(cache, cache_slots, cache_rows, attn_mask, kv_len))


def slot_mask(cache_slots: torch.Tensor, attn_mask: torch.Tensor | None, kv_len: int,
              width: int | None = None) -> torch.Tensor:
    """step_mask's mask [B,1,T,width] from arguments check_step validated; width >= kv_len (default kv_len): the
    columns from kv_len on (slots past the ones read) are False."""
    width = kv_len if width is None else width
    key = torch.arange(width, device=cache_slots.device)
    if attn_mask is None:  # (every slot is < kv_len: the columns from kv_len on come out False)
        mask = key[None, None, :] <= cache_slots[:, :, None]  # [B,T,width]
    else:
        mask = key[None, None, :] == cache_slots[:, :, None]  # own slot always admitted
        (mask if width == kv_len else mask[..., :kv_len]).logical_or_(attn_mask)
    return mask[:, None]


def step_attn_inputs(cos: torch.Tensor, sin: torch.Tensor, cache: KVCache, cache_slots: torch.Tensor,
                     cache_rows: torch.Tensor | None, attn_mask: torch.Tensor | None,
                     kv_len: int | None) -> AttnInputs:
    """AttnInputs for the incremental path (mask: see step_mask)."""
    return AttnInputs(cos=cos, sin=sin, mask=step_mask(cache, cache_slots, cache_rows, attn_mask, kv_len),
                      cache=cache, cache_rows=cache_rows, cache_slots=cache_slots, kv_len=kv_len)
