"""Packed incremental forward: the rollout's fast path for `CausalLM.forward_step` / `mtp_step`.

The same maths, arguments and KV-cache layout as the module path in causal_lm.py / trunk.py (that path is the
reference: tests/model/test_packed.py checks logits, hidden states and cache contents against it, and the
engine's exactness tests run on this path), with fewer and larger ops per decoder block - on a CPU, and for
small batches on a GPU, a decode step costs per op, not per flop:

  * q|k|v projections as ONE matmul (bias fused: addmm), gate|up as ONE matmul; weights pre-transposed;
  * RMSNorm as ONE fused kernel: the residual stream is carried as the signed pair [x, -x] (o_proj and down_proj
    weights packed as [W, -W], the residual add fused into their addmm), and the first half of
    LayerNorm([x, -x]) is exactly RMSNorm(x) (mean 0, variance mean(x^2)); F.rms_norm is ~6 ops on a CPU.
    Models wider than SIGNED_MAX_HIDDEN keep a plain residual stream: there the doubled o/down matmuls cost more
    than the ops saved;
  * RoPE: cos/sin rows looked up from a table built once (same fp32 formula as `rope_cos_sin`), applied to q
    and k together (roll by Dh/2 with a signed sin table = rotate_half); the table covers the cache's slots, so
    a step reads no position back to the host (#26 B6);
  * the attention mask built ONCE per step as an additive float mask (folded for GQA), shared by all layers,
    allocated with the slot count rounded up to 8 (MASK_ALIGN: SDPA on CUDA would pad it again in every layer),
    with `F.scaled_dot_product_attention`, or on the CPU for small head dims and few query rows with
    cpu_attention.py's kernel (SDPA's per-(row, head) GEMM set-up dominates there); a prefill (slots 0..T-1, see
    trunk.is_prefill) takes no mask at all: SDPA's is_causal (the flash kernel on CUDA; on this CPU 0.66-0.94x
    the time of the masked call at 1-64 prompts of 32 tokens); per-layer cache views built once per step (the
    flat write views kept per cache);
  * K/V written with one `index_put_` each into the flattened cache layer (flat indices computed once a step);
  * at one torch thread, matmuls of 2-16 rows against weights of 1 MB or more (verification steps of a model that
    does not fit in cache) through cpu_attention.small_mm, which streams every weight once (1.19-1.36x a 4-row
    verification of a 97M model; one row, or two threads, go through torch's GEMM, which is as fast or faster).
Measured on the benchmark's 24-layer model (benchmarks/rollout.py, docs/rollout.md): plain decoding runs 2.94x
as fast as on the module path at batch 1 and 2.49x at batch 16. Tried and not kept: a hand-written
baddbmm/softmax/bmm attention over K stored slot-minor (3% faster at batch 16, 3% slower at batch 1); the
rotated q|k as extra matmul columns instead of roll (no measurable change); torch.compile (recompiles as the
batch and kv_len change; compiled with dynamic shapes it ran slower than eager).

Weights are packed COPIES: the engine packs again at the start of a generate call whenever the model's
parameters changed, so a policy updated in place by the optimizer (or reloaded) is always what the rollout
samples from. Cost: one copy of the attention and MLP weights of the trunk and the MTP layers (o/down twice:
signed pairs).
Not supported (ValueError): `cache_rows` (the engine keeps live rows as a prefix of the cache and never needs it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, is_dataclass

import torch
import torch.nn.functional as F

from mtprl.model import cpu_attention
from mtprl.model.kv_cache import KVCache
from mtprl.model.trunk import DecoderBlock, check_step, is_prefill, rope_cos_sin, rope_inv_freq, slot_mask


@dataclass
class _Block:
    """One decoder block's packed weights (W stored as [in, out] for x @ W; "signed" = [W, -W], see _norm)."""

    norm1: torch.Tensor  # [2H] = [w, w]
    qkv: torch.Tensor  # [H, (Hq + 2 Hkv) Dh]
    qkv_bias: torch.Tensor | None
    qk_norm: torch.Tensor | None  # [Hq + Hkv, Dh]: q_norm for the q heads, k_norm for the k heads (Qwen3)
    o: torch.Tensor  # signed [Hq Dh, 2H]
    o_bias: torch.Tensor | None  # signed [2H]
    norm2: torch.Tensor  # [2H]
    gate_up: torch.Tensor  # [H, 2 I]
    down: torch.Tensor  # signed [I, 2H]


@dataclass
class _MTP:
    hidden_norm: torch.Tensor  # [2H]
    token_norm: torch.Tensor  # [2H]
    input_proj: torch.Tensor  # signed [2H, 2H]
    block: _Block
    final_norm: torch.Tensor  # [2H]


# Signed pairs halve the ops of a block's two norms but double the o_proj / down_proj matmuls and their weight bytes.
# That pays where a step costs per op (a narrow model: ~10 ops saved per block against hidden x (Hq Dh + I) extra
# multiply-adds per token); wider than this the plain residual stream (F.rms_norm) is faster: on this project's CPU
# plain decoding ran 1.08x as fast at 256 wide (batch 1 and 64), 1.2x at 512 wide, 1.16x for batch-1 decoding of a
# 768-wide model (which reads 1/3 more weight bytes a token signed); at 64-128 wide the two were within noise
# (0.9-1.3x over repeats), and the signed form is what the rollout benchmark was measured with (docs/performance.md).
SIGNED_MAX_HIDDEN = 128

# SDPA's memory-efficient CUDA kernel reads an additive mask whose strides (all but the last) are multiples of 8
# elements; any other mask it pads (a copy) on EVERY call - once per layer. The packed path allocates each step's
# mask with the slot count rounded up to this (the extra columns masked out) and passes a view of the first S
# columns: aligned strides, one mask per step, the same key count.
MASK_ALIGN = 8


def _signed(weight: torch.Tensor, signed: bool = True) -> torch.Tensor:
    """nn.Linear weight [out, in] -> [in, 2 out] = [W^T, -W^T]: x @ it is the signed pair [y, -y] of y = x W^T
    (signed=False: W^T [in, out])."""
    w = weight.detach().t()
    return (torch.cat([w, -w], 1) if signed else w).contiguous()


def _norm_weight(norm: torch.nn.Module, signed: bool = True) -> torch.Tensor:
    w = norm.weight.detach()
    return torch.cat([w, w]) if signed else w


def _pack_block(block: DecoderBlock, signed: bool = True) -> _Block:
    a, m = block.self_attn, block.mlp
    weight = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).detach()  # [(Hq + 2 Hkv) Dh, H]
    bias = None
    if a.q_proj.bias is not None:
        bias = torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]).detach()
    qk_norm = None
    if a.q_norm is not None:
        qk_norm = torch.stack([a.q_norm.weight] * a.num_heads + [a.k_norm.weight] * a.num_kv_heads).detach()
    o_bias = None
    if a.o_proj.bias is not None:
        o_bias = (torch.cat([a.o_proj.bias, -a.o_proj.bias]) if signed else a.o_proj.bias).detach()
    return _Block(
        norm1=_norm_weight(block.input_layernorm, signed),
        qkv=weight.t().contiguous(), qkv_bias=bias, qk_norm=qk_norm, o=_signed(a.o_proj.weight, signed), o_bias=o_bias,
        norm2=_norm_weight(block.post_attention_layernorm, signed),
        gate_up=torch.cat([m.gate_proj.weight, m.up_proj.weight]).detach().t().contiguous(),
        down=_signed(m.down_proj.weight, signed))


def _take(old: torch.Tensor | None, new: torch.Tensor, param_storages: set[int], dtype: torch.dtype) -> torch.Tensor:
    """``new``'s values in ``dtype``: copied (and cast) into ``old``'s storage (a packed copy of the same shape), or
    ``new`` itself when it aliases a parameter already in ``dtype``, or a new tensor (the first pack)."""
    aliases = new.untyped_storage().data_ptr() in param_storages and new.dtype == dtype
    if old is None or aliases or old.shape != new.shape or old.dtype != dtype:
        return new if new.dtype == dtype else new.to(dtype)
    return old.copy_(new)


def _refill(old, new, param_storages: set[int], dtype: torch.dtype):
    """``new`` (a _Block / _MTP packed from the model) in ``dtype``: each packed tensor copied into the same field
    of ``old`` (the previous pack's, or None the first time), each tensor that aliases a parameter taken as is."""
    for f in fields(new):
        src = getattr(new, f.name)
        prev = None if old is None else getattr(old, f.name)
        if is_dataclass(src):
            setattr(new, f.name, _refill(prev, src, param_storages, dtype))
        elif isinstance(src, torch.Tensor):
            setattr(new, f.name, _take(prev, src, param_storages, dtype))
    return new


def _norm(signed: torch.Tensor, weight2: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm(x) * w from the signed pair [x, -x] [..., 2H] and weight2 = [w, w]: the first half of
    LayerNorm([x, -x]) - that row has mean 0 (up to rounding) and variance mean(x^2), so LayerNorm gives
    x / sqrt(mean(x^2) + eps) in ONE fused kernel, where F.rms_norm is a chain of about six ops on a CPU.
    The residual stream is kept as the signed pair (o_proj and down_proj write [y, -y]), so a block's two
    norms cost one kernel each. Normalisation runs in fp32 inside the kernel for any dtype."""
    h = signed.shape[-1] // 2
    return torch.layer_norm(signed, (2 * h,), weight2, None, eps, False)[..., :h]  # F.layer_norm minus its overhead


def _matmul(x: torch.Tensor, w: torch.Tensor, init: torch.Tensor | None = None) -> torch.Tensor:
    """init + x @ w; 2-16 float32 CPU rows against a large weight at one thread (a verification) through
    cpu_attention.small_mm, which streams the weights once (cpu_attention.small_mm_usable)."""
    if x.shape[0] <= cpu_attention.SMALL_MM_MAX_ROWS and cpu_attention.small_mm_usable(x, w):
        return cpu_attention.small_mm(x, w, init)
    return torch.mm(x, w) if init is None else torch.addmm(init, x, w)


def _pair(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, -x], -1)


def _aligned(slots: int) -> int:
    """slots rounded up to a multiple of MASK_ALIGN: the width a step's mask is allocated with."""
    return -(-slots // MASK_ALIGN) * MASK_ALIGN


ChainStep = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class _Step:
    """What every layer of one step shares: RoPE rows, the additive mask, flat cache indices."""

    cos: torch.Tensor  # [B,T,1,Dh]
    sin: torch.Tensor  # signed: [-sin, sin] halves (see _rope_rows)
    # [B,1,rep*T,S] additive (0 / -inf), GQA-folded ([B,1,T,S] when gqa): a view of the first S columns of a mask
    # allocated S rounded up to MASK_ALIGN wide (see _make_step); None when causal
    mask: torch.Tensor | None
    flat_index: torch.Tensor  # [B,T,Hkv] index into a cache layer viewed as [R*Hkv*S, Dh]
    kv_len: int
    batch: int  # B
    tokens: int  # T
    causal: bool  # a prefill: plain causal attention over the step's own T = S tokens (SDPA is_causal, no mask)
    gqa: bool  # attention through SDPA's enable_gqa instead of folding (see _make_step)
    kernel: bool  # attention through cpu_attention.decode_attention (GQA folded)


def weights_signature(params: list[torch.Tensor]) -> tuple:
    """Changes whenever a parameter is modified in place (its version counter: optimizer steps, load_state_dict,
    copy_) or given new storage (`p.data = ...`), so a packed copy is rebuilt only when the weights changed (the
    engine keeps the signature of its last pack and the model's parameter objects from construction: replace a
    submodule -> build a new Engine)."""
    return tuple((p.data_ptr(), p._version) for p in params)


class PackedModel:
    """Packed weights of a CausalLM plus `forward_step` / `mtp_step` with the module path's signatures.

    `config` is the model's config, so code written against CausalLM's incremental API (the engine,
    speculative.py) takes either object. signed: carry the residual stream as signed pairs (see _norm); None =
    for models up to SIGNED_MAX_HIDDEN wide. dtype: of the packed weights (and so of the compute); None = the
    model's. An fp32 policy decoded in bf16 on a GPU keeps this one bf16 copy (its embedding and head included).
    """

    def __init__(self, model: torch.nn.Module, signed: bool | None = None, dtype: torch.dtype | None = None) -> None:
        self.model = model
        self.config = model.config
        self.signed = model.config.hidden_size <= SIGNED_MAX_HIDDEN if signed is None else signed
        self.dtype = dtype or next(model.parameters()).dtype
        self.pack()

    @torch.no_grad()
    def pack(self) -> None:
        """(Re)build the packed copies from the model's current weights. A re-pack (the policy changed) writes
        into the previous pack's tensors one block at a time, so at most one block's packed copy is ever extra
        (building a whole new pack while the old one was still referenced took a second packed copy at the
        peak: +14.6 GiB for MiMo-7B in bf16), cast to the pack's dtype by the copy. Tensors that alias a parameter
        of the pack's dtype (the embedding, an unsigned norm) are taken again, not copied."""
        model, cfg, signed, dtype = self.model, self.config, self.signed, self.dtype
        blocks = (_pack_block(layer, signed) for layer in model.layers)
        mtp = (_MTP(hidden_norm=_norm_weight(m.hidden_layernorm, signed),
                    token_norm=_norm_weight(m.token_layernorm, signed),
                    input_proj=_signed(m.input_proj.weight, signed), block=_pack_block(m.block, signed),
                    final_norm=_norm_weight(m.final_layernorm, signed)) for m in model.mtp_layers)
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        first = getattr(self, "blocks", None) is None
        old_blocks = [None] * len(model.layers) if first else self.blocks
        old_mtp = [None] * len(model.mtp_layers) if first else self.mtp
        self.blocks = [_refill(old, new, params, dtype) for old, new in zip(old_blocks, blocks)]
        self.mtp = [_refill(old, new, params, dtype) for old, new in zip(old_mtp, mtp)]
        self.norm = _take(None if first else self.norm, _norm_weight(model.norm, signed), params, dtype)
        tied = model.head_weight() is model.embed_tokens.weight
        self.embed = _take(None if first else self.embed, model.embed_tokens.weight.detach(), params, dtype)
        self.head = self.embed if tied else _take(None if first else self.head, model.head_weight().detach(), params,
                                                  dtype)
        self.eps = cfg.rms_norm_eps
        self.num_heads, self.num_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cfg.resolved_head_dim
        self._cos = self._sin = None  # RoPE tables [len, Dh], built on first use
        self._row_base: dict = {}  # (B, Hkv, S, device) -> [B,1,Hkv] flat cache index of each row's heads
        self._scalars: dict = {}  # (dtype, device) -> (0, -inf) 0-dim tensors for the additive mask
        self._flat_views: dict = {}  # cache storage + rows -> per-layer flat K / V write views (see _layers)

    def _rope_rows(self, position_ids: torch.Tensor, max_len: int, dtype: torch.dtype
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B,T,1,Dh] for position_ids [B,T], looked up in a table (values as rope_cos_sin) of at least
        max_len positions: the cache's max_seq_len, a bound the caller knows (the engine never puts a token at a
        position past its slot). The table is not sized from the positions themselves: reading their maximum
        would be a host-device sync every step (#26 B6). On the CPU, where that read is free, it also grows to
        any larger position; elsewhere a position >= the table's length is an index out of range."""
        need = max_len
        if position_ids.device.type == "cpu":
            need = max(need, int(position_ids.max()) + 1)
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
                     attn_mask: torch.Tensor | None, kv_len: int | None, dtype: torch.dtype, prefill: bool) -> _Step:
        s = check_step(cache, cache_slots, None, attn_mask, kv_len)  # checked as the module path
        cos, sin = self._rope_rows(position_ids, cache.max_seq_len, dtype)
        flat = self._flat_index(cache_slots, cache)
        b, t = cache_slots.shape
        if is_prefill(cache_slots, attn_mask, s, prefill) and not self._kernel(t, dtype, cache_slots.device):
            return _Step(cos=cos, sin=sin, mask=None, flat_index=flat, kv_len=s, batch=b, tokens=t, causal=True,
                         gqa=False, kernel=False)
        mask = slot_mask(cache_slots, attn_mask, s, _aligned(s))  # [B,1,T,S rounded up], bool
        return self._make_step(cos, sin, mask, flat, dtype, s)

    def _kernel(self, t: int, dtype: torch.dtype, device: torch.device) -> bool:
        """Whether a step of t query rows per row attends through cpu_attention.decode_attention (GQA folded)."""
        return cpu_attention.usable(self.num_heads // self.num_kv_heads * t, self.head_dim, dtype, device)

    def _flat_index(self, cache_slots: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """[B,T,Hkv]: index of each (row, slot, kv head) in a cache layer viewed as [R*Hkv*S, Dh]."""
        b = cache_slots.shape[0]
        hkv, slots = self.num_kv_heads, cache.max_seq_len
        key = (b, hkv, slots, cache_slots.device)
        base = self._row_base.get(key)
        if base is None:  # (row, head) -> first flat index of that row's head in a cache layer [R*Hkv*S, Dh]
            rows = torch.arange(b, device=cache_slots.device)[:, None, None]
            base = self._row_base[key] = (rows * hkv + torch.arange(hkv, device=cache_slots.device)) * slots
        return base + cache_slots[:, :, None]

    def _make_step(self, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor, flat: torch.Tensor,
                   dtype: torch.dtype, kv_len: int) -> _Step:
        """_Step from RoPE rows, the mask [B,1,T,W] (boolean, or already additive; W = kv_len rounded up to
        MASK_ALIGN, the columns from kv_len on masked out) and flat cache indices [B,T,Hkv]."""
        b, _, t, w = mask.shape
        rep = self.num_heads // self.num_kv_heads
        # GQA: either SDPA repeats the kv heads itself (enable_gqa; q and the output stay views of [B,T,H,Dh]), or
        # the rep query heads sharing a kv head are folded into the query axis (mask [B,1,rep*T,S]; q and the
        # output are copied when T > 1). Measured on a CPU: folding is faster from ~16 query rows on, SDPA's own
        # GQA below that (benchmarks/rollout.py's model: 0.7x the attention time at batch 16, 0.9x at batch 1).
        # On CUDA always folded: SDPA's memory-efficient kernel (the one that takes a mask) has no GQA.
        kernel = self._kernel(t, dtype, mask.device)
        gqa = rep > 1 and b * t < 16 and not kernel and mask.device.type == "cpu"
        if rep > 1 and not gqa:
            mask = mask[:, :, None].expand(b, 1, rep, t, w).reshape(b, 1, rep * t, w)
        additive = mask
        if mask.dtype == torch.bool:
            zero, neg_inf = self._mask_values(dtype, mask.device)
            additive = torch.where(mask, zero, neg_inf)
        if w != kv_len:  # a view: the rows keep the aligned stride W (see MASK_ALIGN)
            additive = additive[..., :kv_len]
        return _Step(cos=cos, sin=sin, mask=additive, flat_index=flat, kv_len=kv_len, batch=b, tokens=t, causal=False,
                     gqa=gqa, kernel=kernel)

    def _mask_values(self, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (dtype, device)
        if key not in self._scalars:
            self._scalars[key] = (torch.zeros((), dtype=dtype, device=device),
                                  torch.full((), float("-inf"), dtype=dtype, device=device))
        return self._scalars[key]

    def _rms(self, xx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """RMSNorm(x) * w of the residual stream: signed pairs (_norm) or plain (F.rms_norm, fp32 inside)."""
        return _norm(xx, weight, self.eps) if self.signed else F.rms_norm(xx, (xx.shape[-1],), weight, self.eps)

    def _stream(self, x: torch.Tensor) -> torch.Tensor:
        """x [.., H] as the residual stream: the signed pair [x, -x], or x itself."""
        return _pair(x) if self.signed else x

    # ----- one decoder block -----------------------------------------------------------------------------------
    def _block(self, w: _Block, xx: torch.Tensor, step: _Step, k_flat: torch.Tensor, v_flat: torch.Tensor,
               keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Residual stream xx [B*T, 2H] as the signed pair [x, -x] (or [B*T, H] plain; rows b-major) -> the same after the block.
        k_flat, v_flat: this layer's cache rows viewed [rows*Hkv*S, Dh] (written); keys, values: [B,Hkv,S',Dh]
        views of the same cache, the first kv_len slots (read after the write)."""
        b, t = step.batch, step.tokens
        hq, hkv, dh, eps = self.num_heads, self.num_kv_heads, self.head_dim, self.eps
        h = self._rms(xx, w.norm1)
        qkv = _matmul(h, w.qkv, w.qkv_bias)
        qk, v = qkv.split_with_sizes([(hq + hkv) * dh, hkv * dh], 1)  # (Tensor.split is a slow Python wrapper)
        qk = qk.view(b, t, hq + hkv, dh)
        if w.qk_norm is not None:
            qk = _norm(_pair(qk), None, eps) * w.qk_norm
        qk = torch.addcmul(qk * step.cos, qk.roll(dh // 2, -1), step.sin)  # RoPE on q and k: [B,T,Hq+Hkv,Dh]
        q, k = qk.split_with_sizes([hq, hkv], 2)
        v = v.view(b, t, hkv, dh)
        if keys.dtype != xx.dtype:  # a cache in another dtype than the model
            k, v = k.to(keys.dtype), v.to(keys.dtype)
        k_flat.index_put_((step.flat_index,), k)  # (index_put_ takes the strided k / v without a copy)
        v_flat.index_put_((step.flat_index,), v)
        if keys.dtype != xx.dtype:
            keys, values = keys.to(xx.dtype), values.to(xx.dtype)
        q = q.transpose(1, 2)  # [B,Hq,T,Dh]
        if step.causal:  # a prefill (see trunk.is_prefill): keys are the step's own T tokens, causal, no mask
            out = F.scaled_dot_product_attention(q, keys, values, is_causal=True, enable_gqa=hq > hkv)
        elif step.gqa:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=step.mask, enable_gqa=True)
        else:  # the rep query heads of a kv head folded into its query rows (a view when T = 1 or rep = 1)
            qf = q.reshape(b, hkv, (hq // hkv) * t, dh)
            if step.kernel:
                out = cpu_attention.decode_attention(qf, keys, values, step.mask, dh ** -0.5)
            else:
                out = F.scaled_dot_product_attention(qf, keys, values, attn_mask=step.mask)
            out = out.reshape(b, hq, t, dh)
        out = out.transpose(1, 2).reshape(b * t, hq * dh)
        xx = _matmul(out, w.o, xx if w.o_bias is None else xx + w.o_bias)
        gate, up = _matmul(self._rms(xx, w.norm2), w.gate_up).chunk(2, 1)
        return _matmul(F.silu(gate) * up, w.down, xx)

    def _layers(self, cache: KVCache, b: int, kv_len: int, layer: int | None = None):
        """Per layer (k_flat, v_flat, keys, values): views of the cache's first b rows, for all layers at once
        (built once per step) or for one `layer`. The flat write views do not depend on the step: they are kept
        per cache storage and row count (a view costs about a microsecond; a 24-layer step needs 48 of them)."""
        k, v = cache.k[:, :b], cache.v[:, :b]
        if layer is not None:
            k, v = k[layer:layer + 1], v[layer:layer + 1]
        key = (k.data_ptr(), v.data_ptr(), k.shape, k.stride(), v.stride())
        flat = self._flat_views.get(key)
        if flat is None:
            if len(self._flat_views) > 16:  # views keep their cache alive: stay bounded (pack() clears)
                self._flat_views.clear()
            num_layers, dh = k.shape[0], self.head_dim
            flat = self._flat_views[key] = (k.view(num_layers, -1, dh).unbind(0), v.view(num_layers, -1, dh).unbind(0))
        return zip(*flat, k[:, :, :, :kv_len].unbind(0), v[:, :, :, :kv_len].unbind(0))

    # ----- the incremental API (as CausalLM) ---------------------------------------------------------------------
    @torch.no_grad()
    def forward_step(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache_slots: torch.Tensor,
                     kv_cache: KVCache, cache_rows: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                     *, kv_len: int | None = None, logit_index: torch.Tensor | None = None, prefill: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """As CausalLM.forward_step. A prefill (cache_slots 0..T-1 in every row, kv_len = T, no attn_mask) attends
        through SDPA's is_causal without a mask; on the CPU it is recognised from the slots, elsewhere only with
        prefill=True (recognising it there would be a host-device sync)."""
        from mtprl.model.causal_lm import _check_step_shapes, at_positions

        if cache_rows is not None:
            raise ValueError("the packed path does not take cache_rows: pass a view of the cache rows instead")
        _check_step_shapes(input_ids, position_ids, cache_slots, kv_cache, self.config.num_hidden_layers, "kv_cache")
        b, t = input_ids.shape
        xx = self._stream(F.embedding(input_ids, self.embed).view(b * t, -1))
        step = self._step_inputs(position_ids, cache_slots, kv_cache, attn_mask, kv_len, xx.dtype, prefill)
        for w, views in zip(self.blocks, self._layers(kv_cache, b, step.kv_len)):
            xx = self._block(w, xx, step, *views)
        hidden = self._rms(xx, self.norm).reshape(b, t, -1)
        return F.linear(at_positions(hidden, logit_index), self.head), hidden

    @torch.no_grad()
    def mtp_step(self, depth: int, prev_hidden: torch.Tensor, input_ids: torch.Tensor, position_ids: torch.Tensor,
                 cache_slots: torch.Tensor, mtp_kv_cache: KVCache, cache_rows: torch.Tensor | None = None,
                 attn_mask: torch.Tensor | None = None, *, kv_len: int | None = None,
                 logit_index: torch.Tensor | None = None, prefill: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """As CausalLM.mtp_step (prefill: as forward_step)."""
        from mtprl.model.causal_lm import _check_step_shapes

        self._check_depth(depth)
        if cache_rows is not None:
            raise ValueError("the packed path does not take cache_rows: pass a view of the cache rows instead")
        _check_step_shapes(input_ids, position_ids, cache_slots, mtp_kv_cache, len(self.mtp), "mtp_kv_cache")
        if prev_hidden.shape[:2] != input_ids.shape:
            raise ValueError(f"prev_hidden {tuple(prev_hidden.shape)} must be [B,T,H] with B,T of input_ids "
                             f"{tuple(input_ids.shape)}")
        w = self.mtp[depth]
        step = self._step_inputs(position_ids, cache_slots, mtp_kv_cache, attn_mask, kv_len, w.input_proj.dtype,
                                 prefill)
        (views,) = self._layers(mtp_kv_cache, input_ids.shape[0], step.kv_len, depth)
        return self._mtp_forward(w, prev_hidden, input_ids, step, views, logit_index)

    @torch.no_grad()
    def mtp_chain(self, depth: int, position_ids: torch.Tensor, cache_slots: torch.Tensor, mtp_kv_cache: KVCache,
                  *, kv_len: int | None = None) -> ChainStep:
        """n one-token MTP steps of layer `depth` run one after another, step i at position_ids[:, i] and
        cache_slots[:, i] ([B,n]) with the default mask (key slot <= query slot) over kv_len slots - a chain of
        drafts, where each step's input is the last one's output. Returns step(i, prev_hidden [B,1,H],
        input_ids [B,1]) -> (logits [B,1,V], hidden [B,1,H]), equal to mtp_step on the same inputs: the per-step
        inputs (mask, RoPE rows, cache indices, cache views) are built once here for all n, not once per step."""
        from mtprl.model.causal_lm import _check_step_shapes

        self._check_depth(depth)
        _check_step_shapes(position_ids, position_ids, cache_slots, mtp_kv_cache, len(self.mtp), "mtp_kv_cache")
        w = self.mtp[depth]
        dtype = w.input_proj.dtype
        s = check_step(mtp_kv_cache, cache_slots, None, None, kv_len)
        mask = slot_mask(cache_slots, None, s, _aligned(s))  # [B,1,n,S rounded up]
        zero, neg_inf = self._mask_values(dtype, mask.device)
        cos, sin = self._rope_rows(position_ids, mtp_kv_cache.max_seq_len, dtype)
        ones = [1] * cache_slots.shape[1]  # (split_with_sizes: Tensor.split is a slow Python wrapper)
        steps = [self._make_step(*parts, dtype, s) for parts in zip(
            cos.split_with_sizes(ones, 1), sin.split_with_sizes(ones, 1),
            torch.where(mask, zero, neg_inf).split_with_sizes(ones, 2),
            self._flat_index(cache_slots, mtp_kv_cache).split_with_sizes(ones, 1))]
        (views,) = self._layers(mtp_kv_cache, cache_slots.shape[0], s, depth)

        def step(i: int, prev_hidden: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            with torch.no_grad():
                return self._mtp_forward(w, prev_hidden, input_ids, steps[i], views)

        return step

    def _check_depth(self, depth: int) -> None:
        if not 0 <= depth < len(self.mtp):
            raise ValueError(f"depth={depth} out of range: this model has {len(self.mtp)} MTP layers")

    def _mtp_forward(self, w: _MTP, prev_hidden: torch.Tensor, input_ids: torch.Tensor, step: _Step,
                     views: tuple, logit_index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        b, t = step.batch, step.tokens
        emb = F.embedding(input_ids, self.embed).view(b * t, -1)
        h = prev_hidden.reshape(b * t, -1)
        xx = _matmul(torch.cat([self._rms(self._stream(h), w.hidden_norm), self._rms(self._stream(emb), w.token_norm)],
                               -1), w.input_proj)
        xx = self._block(w.block, xx, step, *views)
        hidden = self._rms(xx, w.final_norm).reshape(b, t, -1)
        from mtprl.model.causal_lm import at_positions

        return F.linear(at_positions(hidden, logit_index), self.head), hidden
