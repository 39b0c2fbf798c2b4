"""Packed incremental forward: the rollout's fast path for `CausalLM.forward_step` / `mtp_step`.

The same maths, arguments and KV-cache layout as the module path in causal_lm.py / trunk.py (that path is the
reference: tests/model/test_packed.py checks logits, hidden states and cache contents against it), with fewer
and larger ops per decoder block - on a CPU, and for small batches on a GPU, a decode step is dominated by the
fixed cost of each op, not by arithmetic:

  * q|k|v projections as ONE matmul (bias fused: addmm), gate|up as ONE matmul; weights pre-transposed;
  * the residual adds fused into the o_proj and down_proj matmuls (addmm(x, a, W) = x + a @ W);
  * RMSNorm as one fused op (`F.rms_norm`, fp32 in/out; other dtypes normalise in fp32 as HF does);
  * RoPE: cos/sin rows looked up from a table built once (same fp32 formula as `rope_cos_sin`, so the values
    are bitwise those of the module path), applied to q and k together (one rotate, one fused multiply-add);
  * the attention mask built ONCE per step as an additive float mask (already folded for GQA) and shared by all
    layers; `F.scaled_dot_product_attention` with it (a hand-written baddbmm/softmax/bmm, with K stored
    slot-minor, was measured: 3% faster at batch 16, 3% slower at batch 1 - not kept);
  * K/V written with one `index_copy_` each into the flattened cache layer, the flat indices computed once per
    step.

Weights are packed COPIES: `PackedModel.from_model` packs, and the engine packs again at the start of every
generate call, so a policy updated in place by the optimizer (or reloaded) is always what the rollout samples
from. Cost: one copy of the attention and MLP weights of the trunk and MTP layers (see docs/rollout.md).
Not supported (ValueError): `cache_rows` (the engine keeps live rows as a prefix of the cache and never needs it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mtprl.model.kv_cache import KVCache
from mtprl.model.trunk import DecoderBlock, rope_cos_sin, rope_inv_freq, step_mask


@dataclass
class _Block:
    """One decoder block's packed weights (W stored as [in, out] for x @ W)."""

    norm1: torch.Tensor  # [2H] = [w, w] (see _rms_norm)
    qkv: torch.Tensor  # [H, (Hq + 2 Hkv) Dh]
    qkv_bias: torch.Tensor | None
    q_norm: torch.Tensor | None  # [2Dh] (Qwen3)
    k_norm: torch.Tensor | None
    o: torch.Tensor  # [Hq Dh, H]
    o_bias: torch.Tensor | None
    norm2: torch.Tensor
    gate_up: torch.Tensor  # [H, 2 I]
    down: torch.Tensor  # [I, H]


@dataclass
class _MTP:
    hidden_norm: torch.Tensor
    token_norm: torch.Tensor
    input_proj: torch.Tensor  # [2H, H]
    block: _Block
    final_norm: torch.Tensor


def _pack_block(block: DecoderBlock) -> _Block:
    a, m = block.self_attn, block.mlp
    bias = None
    if a.q_proj.bias is not None:
        bias = torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]).detach()
    return _Block(
        norm1=_norm_weight(block.input_layernorm),
        qkv=torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).detach().t().contiguous(),
        qkv_bias=bias,
        q_norm=None if a.q_norm is None else _norm_weight(a.q_norm),
        k_norm=None if a.k_norm is None else _norm_weight(a.k_norm),
        o=a.o_proj.weight.detach().t().contiguous(),
        o_bias=None if a.o_proj.bias is None else a.o_proj.bias.detach(),
        norm2=_norm_weight(block.post_attention_layernorm),
        gate_up=torch.cat([m.gate_proj.weight, m.up_proj.weight]).detach().t().contiguous(),
        down=m.down_proj.weight.detach().t().contiguous())


def _rms_norm(x: torch.Tensor, weight2: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm(x) * w with the module path's numerics (normalise in fp32); weight2 = [w, w] (see _norm_weight).

    fp32: the first half of LayerNorm([x, -x]): that row has mean 0 (up to rounding) and variance mean(x^2), so
    it is x / sqrt(mean(x^2) + eps) - ONE fused kernel plus a concatenation, where F.rms_norm is a chain of about
    six ops on a CPU (the largest single cost of a small decode step). Other dtypes: fp32 F.rms_norm, cast back."""
    h = x.shape[-1]
    if x.dtype == torch.float32:
        return F.layer_norm(torch.cat([x, -x], -1), (2 * h,), weight2, None, eps)[..., :h]
    return weight2[:h] * F.rms_norm(x.float(), (h,), None, eps).to(x.dtype)


def _norm_weight(norm: torch.nn.Module) -> torch.Tensor:
    w = norm.weight.detach()
    return torch.cat([w, w])


@dataclass
class _Step:
    """What every layer of one step shares: RoPE rows, the additive mask, flat cache indices."""

    cos: torch.Tensor  # [B,T,1,Dh]
    sin: torch.Tensor  # signed: [-sin, sin] halves (see _rope_rows)
    mask: torch.Tensor  # [B,1,rep*T,S] additive (0 / -inf), GQA-folded
    flat_index: torch.Tensor  # [B*T*Hkv] index into a cache layer viewed as [R*Hkv*S, Dh]
    kv_len: int


class PackedModel:
    """Packed weights of a CausalLM plus `forward_step` / `mtp_step` with the module path's signatures.

    `config` is the model's config, so code written against CausalLM's incremental API (the engine,
    speculative.py) takes either object.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.config = model.config
        self.pack()

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> "PackedModel":
        return cls(model)

    @torch.no_grad()
    def pack(self) -> None:
        """(Re)build the packed copies from the model's current weights."""
        model, cfg = self.model, self.config
        self.blocks = [_pack_block(layer) for layer in model.layers]
        self.mtp = [_MTP(hidden_norm=_norm_weight(m.hidden_layernorm), token_norm=_norm_weight(m.token_layernorm),
                         input_proj=m.input_proj.weight.detach().t().contiguous(), block=_pack_block(m.block),
                         final_norm=_norm_weight(m.final_layernorm)) for m in model.mtp_layers]
        self.embed = model.embed_tokens.weight.detach()
        self.norm = _norm_weight(model.norm)
        self.head = model.head_weight().detach()
        self.eps = cfg.rms_norm_eps
        self.num_heads, self.num_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cfg.resolved_head_dim
        self._cos = self._sin = None  # RoPE tables [len, Dh], built on first use

    def _rope_rows(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B,T,1,Dh] for position_ids [B,T], from a table grown on demand (values as rope_cos_sin)."""
        need = int(position_ids.max()) + 1  # a host sync; the engine syncs every step anyway
        cos = self._cos
        if cos is None or need > cos.shape[0] or cos.dtype != dtype or cos.device != position_ids.device:
            length = max(need, 0 if cos is None else 2 * cos.shape[0], 256)
            inv_freq = rope_inv_freq(self.config).to(position_ids.device)
            cos, sin = rope_cos_sin(inv_freq, torch.arange(length, device=position_ids.device)[None], dtype)
            half = sin.shape[-1] // 2  # rotate_half(x) * sin == roll(x, half) * [-sin_1, sin_2]: one kernel less
            self._cos, self._sin = cos[0, 0], torch.cat([-sin[0, 0, :, :half], sin[0, 0, :, half:]], -1)  # [len, Dh]
        return self._cos[position_ids][:, :, None], self._sin[position_ids][:, :, None]

    # ----- shared per-step inputs ------------------------------------------------------------------------------
    def _step_inputs(self, position_ids: torch.Tensor, cache_slots: torch.Tensor, cache: KVCache,
                     attn_mask: torch.Tensor | None, kv_len: int | None, dtype: torch.dtype) -> _Step:
        b, t = cache_slots.shape
        mask = step_mask(cache, cache_slots, None, attn_mask, kv_len)  # [B,1,T,S], checked as the module path
        s = mask.shape[-1]
        rep = self.num_heads // self.num_kv_heads
        if rep > 1:  # fold the rep query heads sharing a kv head into the query axis: [B,1,rep*T,S]
            mask = mask[:, :, None].expand(b, 1, rep, t, s).reshape(b, 1, rep * t, s)
        additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
        hkv, slots = self.num_kv_heads, cache.max_seq_len
        rows = torch.arange(b, device=cache_slots.device)[:, None, None]
        heads = torch.arange(hkv, device=cache_slots.device)[None, None, :]
        flat = ((rows * hkv + heads) * slots + cache_slots[:, :, None]).reshape(-1)  # [B*T*Hkv], order (b, t, h)
        cos, sin = self._rope_rows(position_ids, dtype)
        return _Step(cos=cos, sin=sin, mask=additive, flat_index=flat, kv_len=s)

    # ----- one decoder block -----------------------------------------------------------------------------------
    def _block(self, w: _Block, x: torch.Tensor, step: _Step, cache: KVCache, layer: int) -> torch.Tensor:
        """x [B*T, H] (rows b-major) -> [B*T, H]."""
        b, t = step.cos.shape[:2]
        hq, hkv, dh, eps = self.num_heads, self.num_kv_heads, self.head_dim, self.eps
        h = _rms_norm(x, w.norm1, eps)
        qkv = torch.mm(h, w.qkv) if w.qkv_bias is None else torch.addmm(w.qkv_bias, h, w.qkv)
        qk = qkv[:, :(hq + hkv) * dh].view(b, t, hq + hkv, dh)
        v = qkv[:, (hq + hkv) * dh:]
        if w.q_norm is not None:
            qk = torch.cat([_rms_norm(qk[:, :, :hq], w.q_norm, eps), _rms_norm(qk[:, :, hq:], w.k_norm, eps)], 2)
        qk = torch.addcmul(qk * step.cos, qk.roll(dh // 2, -1), step.sin)  # RoPE on q and k: [B,T,Hq+Hkv,Dh]
        k_layer, v_layer = cache.k[layer], cache.v[layer]  # [b,Hkv,S,Dh] (a prefix view of the cache rows)
        k_layer.view(-1, dh).index_copy_(0, step.flat_index, qk[:, :, hq:].reshape(-1, dh).to(k_layer.dtype))
        v_layer.view(-1, dh).index_copy_(0, step.flat_index, v.reshape(-1, dh).to(v_layer.dtype))
        keys, values = k_layer[:, :, :step.kv_len], v_layer[:, :, :step.kv_len]
        if keys.dtype != x.dtype:
            keys, values = keys.to(x.dtype), values.to(x.dtype)
        q = qk[:, :, :hq].transpose(1, 2)  # [B,Hq,T,Dh]
        if hq != hkv:
            q = q.reshape(b, hkv, (hq // hkv) * t, dh)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=step.mask)  # [B,Hkv,rep*T,Dh]
        out = out.reshape(b, hq, t, dh).transpose(1, 2).reshape(b * t, hq * dh)
        x = torch.addmm(x, out, w.o) if w.o_bias is None else torch.addmm(x + w.o_bias, out, w.o)
        h = _rms_norm(x, w.norm2, eps)
        gate_up = torch.mm(h, w.gate_up)
        inter = gate_up.shape[-1] // 2
        return torch.addmm(x, F.silu(gate_up[:, :inter]) * gate_up[:, inter:], w.down)

    # ----- the incremental API (as CausalLM) ---------------------------------------------------------------------
    @torch.no_grad()
    def forward_step(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache_slots: torch.Tensor,
                     kv_cache: KVCache, cache_rows: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                     *, kv_len: int | None = None, logit_index: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """As CausalLM.forward_step."""
        from mtprl.model.causal_lm import _check_step_shapes

        if cache_rows is not None:
            raise ValueError("the packed path does not take cache_rows: pass a view of the cache rows instead")
        _check_step_shapes(input_ids, position_ids, cache_slots, kv_cache, self.config.num_hidden_layers, "kv_cache")
        b, t = input_ids.shape
        x = F.embedding(input_ids, self.embed).view(b * t, -1)
        step = self._step_inputs(position_ids, cache_slots, kv_cache, attn_mask, kv_len, x.dtype)
        for i, w in enumerate(self.blocks):
            x = self._block(w, x, step, kv_cache, i)
        hidden = _rms_norm(x, self.norm, self.eps).view(b, t, -1)
        if logit_index is not None:
            hidden_at = hidden.gather(1, logit_index[:, :, None].expand(-1, -1, hidden.shape[-1]))
            return F.linear(hidden_at, self.head), hidden
        return F.linear(hidden, self.head), hidden

    @torch.no_grad()
    def mtp_step(self, depth: int, prev_hidden: torch.Tensor, input_ids: torch.Tensor, position_ids: torch.Tensor,
                 cache_slots: torch.Tensor, mtp_kv_cache: KVCache, cache_rows: torch.Tensor | None = None,
                 attn_mask: torch.Tensor | None = None, *, kv_len: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """As CausalLM.mtp_step."""
        from mtprl.model.causal_lm import _check_step_shapes

        if not 0 <= depth < len(self.mtp):
            raise ValueError(f"depth={depth} out of range: this model has {len(self.mtp)} MTP layers")
        if cache_rows is not None:
            raise ValueError("the packed path does not take cache_rows: pass a view of the cache rows instead")
        _check_step_shapes(input_ids, position_ids, cache_slots, mtp_kv_cache, len(self.mtp), "mtp_kv_cache")
        if prev_hidden.shape[:2] != input_ids.shape:
            raise ValueError(f"prev_hidden {tuple(prev_hidden.shape)} must be [B,T,H] with B,T of input_ids "
                             f"{tuple(input_ids.shape)}")
        w = self.mtp[depth]
        b, t = input_ids.shape
        emb = F.embedding(input_ids, self.embed).view(b * t, -1)
        h = prev_hidden.reshape(b * t, -1)
        x = torch.mm(torch.cat([_rms_norm(h, w.hidden_norm, self.eps), _rms_norm(emb, w.token_norm, self.eps)], -1),
                     w.input_proj)
        step = self._step_inputs(position_ids, cache_slots, mtp_kv_cache, attn_mask, kv_len, x.dtype)
        x = self._block(w.block, x, step, mtp_kv_cache, depth)
        hidden = _rms_norm(x, w.final_norm, self.eps).view(b, t, -1)
        return F.linear(hidden, self.head), hidden

