"""CausalLM: embedding -> N decoder blocks -> final RMSNorm -> LM head, plus D MTP layers sharing the
embedding and the head. A plain nn.Module; checkpoint mapping lives in `hf_io`, parallelism outside.

Two entry points run the same block code (see trunk.py):
  * `forward` - full sequences (training / teacher forcing), returns trunk logits, hidden, per-depth MTP logits;
  * `forward_step` / `mtp_step` - incremental with a static KVCache (rollout, speculative drafting).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mtprl.model.config import ModelConfig
from mtprl.model.head import TokenScoring, head_for_matmul, reference_token_scores, token_scores
from mtprl.model.kv_cache import KVCache
from mtprl.model.mtp import MTPLayer, Recursion, mtp_token_scores, reference_mtp_token_scores, shift_left
from mtprl.model.trunk import (AttnInputs, DecoderBlock, RMSNorm, UniqueTokens, full_attn_inputs, is_right_padded,
                               is_prefill, rope_cos_sin, rope_inv_freq, step_attn_inputs)


@dataclass
class CausalLMOutput:
    """logits [B,T,V] (position t predicts token t+1); hidden_states [B,T,H] (trunk, after the final norm = h^0);
    mtp_logits: D tensors [B,T,V] (K with mtp_recursive_steps=K > D: depths D+1..K are the last layer reused
    recursively), mtp_logits[k-1][:, i] predicts token i+k+1 (positions with i+k >= T are garbage);
    mtp_hidden_states: the same number of [B,T,H] tensors (h^k).

    With forward(scoring=...) (model.head.TokenScoring) no [B,T,V] tensor is made: logits is None, mtp_logits
    empty, and instead token_logprobs [B,T] / token_entropy [B,T] | None (the scored tokens') and, when the
    request names an MTP loss mask, mtp_token_losses / mtp_token_correct: one [B,T] per depth
    (mtp.mtp_token_scores; reduce with mtp.mtp_loss_from_scores)."""

    logits: torch.Tensor | None
    hidden_states: torch.Tensor
    mtp_logits: list[torch.Tensor] = field(default_factory=list)
    mtp_hidden_states: list[torch.Tensor] = field(default_factory=list)
    token_logprobs: torch.Tensor | None = None
    token_entropy: torch.Tensor | None = None
    mtp_token_losses: list[torch.Tensor] = field(default_factory=list)
    mtp_token_correct: list[torch.Tensor] = field(default_factory=list)


def default_position_ids(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """[B,T] positions: arange per row, or cumsum(attention_mask) - 1 (clamped at 0) when a mask is given,
    so that left-padded rows start their real tokens at position 0."""
    if attention_mask is None:
        return torch.arange(input_ids.shape[1], device=input_ids.device)[None].expand_as(input_ids)
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class CausalLM(nn.Module):
    """Decoder-only LM with D MTP layers. Random init (normal(0, initializer_range), zero biases, unit norms);
    seed with torch.manual_seed before constructing for reproducibility.

    Parameter names: embed_tokens, layers.{i}.{input_layernorm, self_attn.{q,k,v,o}_proj, self_attn.{q,k}_norm,
    post_attention_layernorm, mlp.{gate,up,down}_proj}, norm, lm_head (absent when tied: the head is
    embed_tokens.weight), mtp_layers.{k}.{hidden_layernorm, token_layernorm, input_proj, block.*, final_layernorm}.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([DecoderBlock(config) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = (None if config.tie_word_embeddings
                        else nn.Linear(config.hidden_size, config.vocab_size, bias=False))
        self.mtp_layers = nn.ModuleList([MTPLayer(config) for _ in range(config.num_mtp_layers)])
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        # HF directory this model was loaded from (its tokenizer files are copied on save)
        self.source_dir: str | None = None
        if not self.embed_tokens.weight.is_meta:
            self.reset_parameters()

    # ----- init / helpers ---------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
        self.inv_freq.copy_(rope_inv_freq(self.config))

    def head_weight(self) -> torch.Tensor:
        """The output head [V,H] (embed_tokens.weight when tied)."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def num_mtp_depths(self, recursive_steps: int = 0) -> int:
        """How many depths forward(compute_mtp=True, mtp_recursive_steps=recursive_steps) returns in mtp_logits:
        the MTP layers D, or K = recursive_steps when K > D (the last layer reused for depths D+1..K)."""
        return max(len(self.mtp_layers), recursive_steps) if self.mtp_layers else 0

    def _rope(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq
        if inv_freq.dtype != torch.float32:  # model.to(bf16) also casts buffers: recompute the fp32 table
            inv_freq = rope_inv_freq(self.config).to(position_ids.device)
        return rope_cos_sin(inv_freq, position_ids, dtype)

    # ----- full-sequence forward ----------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        compute_mtp: bool = True,
        mtp_detach_encoder: bool = False,
        mtp_detach_head: bool = False,
        mtp_recursive_steps: int = 0,
        unique_tokens: UniqueTokens | None = None,
        scoring: TokenScoring | None = None,
    ) -> CausalLMOutput:
        """input_ids [B,T]; position_ids [B,T] (default: see default_position_ids); attention_mask [B,T] 1 = real.

        unique_tokens: run the trunk's projections, MLPs and head once per unique token (a prompt shared by a
            group's samples once, padding never), attention per row; the outputs are the rows' as without it
            (up to rounding) and gradients sum over the slots sharing a token. See trunk.UniqueTokens.

        compute_mtp: run the MTP layers (False: mtp_logits == []).
        mtp_detach_encoder: the MTP path sees the trunk hidden h^0, the embedding table and (when tied, the head
            IS that table) the output head detached, so an MTP loss sends no gradient into the trunk or the
            embedding table by any route. An untied lm_head still trains from the MTP loss (mtp_detach_head).
        mtp_detach_head: the MTP logits use the head weight detached (lm_head untied; the embedding table as
            head when tied, while the token lookup Emb(t_{i+k}) still trains it unless mtp_detach_encoder).
        mtp_recursive_steps: K > D adds depths D+1..K to mtp_logits / mtp_hidden_states: the last MTP layer
            reused on its own output as the rollout drafts them (mtp.py, "Recursive depths"); the detach
            options apply to them too. K <= D adds nothing.
        scoring: per-token scores instead of logits (model.head.TokenScoring, CausalLMOutput): the head runs on
            chunks of the scored positions inside this call (under FSDP2 the head is gathered only here).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B,T], got shape {tuple(input_ids.shape)}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids "
                             f"{tuple(input_ids.shape)}")
        if position_ids is None and attention_mask is None:  # one RoPE table [1,T] broadcast over the batch
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        elif position_ids is None:
            position_ids = default_position_ids(input_ids, attention_mask)
        head = self.head_weight()
        dtype = self.embed_tokens.weight.dtype
        cos, sin = self._rope(position_ids, dtype)
        # right padding only (SFT batches, unpadded rows): plain causal attention already hides every padding key
        # from every real query (its keys are earlier, so real), so the padding mask is dropped and never built
        # (SDPA's is_causal path); only padding positions' garbage changes
        key_padding = None if attention_mask is None or is_right_padded(attention_mask) else attention_mask
        attn = full_attn_inputs(cos, sin, key_padding)
        if unique_tokens is None:
            x = self.embed_tokens(input_ids)  # [B,T,H]
            for i, layer in enumerate(self.layers):
                x = layer(x, attn, i)
            hidden = self.norm(x)  # h^0 [B,T,H]
            logits = None if scoring is not None else F.linear(hidden, head)
            out = CausalLMOutput(logits=logits, hidden_states=hidden)
        else:
            unique = self._unique_trunk(input_ids, position_ids, attn, unique_tokens)  # [M,H]
            hidden = unique[unique_tokens.expand_index]
            logits = None if scoring is not None else F.linear(unique, head)[unique_tokens.expand_index]
            out = CausalLMOutput(logits=logits, hidden_states=hidden)
        if not compute_mtp or not self.mtp_layers:
            return out if scoring is None else self._score(out, input_ids, head, head, scoring)
        emb_weight = self.embed_tokens.weight.detach() if mtp_detach_encoder else self.embed_tokens.weight
        # tied: head is embed_tokens.weight, so detaching the encoder must detach the MTP path's head too
        detach_head = mtp_detach_head or (mtp_detach_encoder and self.lm_head is None)
        mtp_head = head.detach() if detach_head else head
        prev = hidden.detach() if mtp_detach_encoder else hidden
        depth, recursive = len(self.mtp_layers), []
        levels = self.num_mtp_depths(mtp_recursive_steps) - depth
        for k, mtp_layer in enumerate(self.mtp_layers, start=1):
            tok_emb = F.embedding(shift_left(input_ids, k), emb_weight)  # Emb(t_{i+k}) [B,T,H]
            if k == depth and levels > 0:  # the recursion inside the layer's own call (FSDP unit)
                prev, recursive = mtp_layer(prev, tok_emb, attn, k - 1,
                                            recursion=Recursion(levels, cos, sin, key_padding))
            else:
                prev = mtp_layer(prev, tok_emb, attn, k - 1)  # h^k [B,T,H]
            out.mtp_hidden_states.append(prev)
        out.mtp_hidden_states.extend(recursive)  # depths D+1..K
        if scoring is not None:
            return self._score(out, input_ids, head, mtp_head, scoring)
        out.mtp_logits.extend(F.linear(h, mtp_head) for h in out.mtp_hidden_states)
        return out

    def _score(self, out: CausalLMOutput, input_ids: torch.Tensor, head: torch.Tensor, mtp_head: torch.Tensor,
               scoring: TokenScoring) -> CausalLMOutput:
        """Fill out's token scores (scoring's request) from its hidden states, a chunk of positions at a time."""
        if scoring.reference:
            return self._score_reference(out, input_ids, head, mtp_head, scoring)
        head_mm = head_for_matmul(out.hidden_states, head)  # one bf16 copy under autocast, read by every call
        out.token_logprobs, out.token_entropy = token_scores(
            out.hidden_states, head, input_ids, scoring.score_mask, temperature=scoring.temperature,
            entropy=scoring.entropy, weight_mm=head_mm, chunk_size=scoring.chunk_size)
        if scoring.mtp_loss_mask is not None and out.mtp_hidden_states:
            out.mtp_token_losses, out.mtp_token_correct = mtp_token_scores(
                out.mtp_hidden_states, mtp_head, input_ids, scoring.mtp_loss_mask, loss_type=scoring.mtp_loss_type,
                trunk_hidden=out.hidden_states.detach(), trunk_head=head_mm, attention_mask=scoring.attention_mask,
                head_mm=head_mm, chunk_size=scoring.chunk_size)
        return out

    def _score_reference(self, out: CausalLMOutput, input_ids: torch.Tensor, head: torch.Tensor,
                         mtp_head: torch.Tensor, scoring: TokenScoring) -> CausalLMOutput:
        """_score from full [B,T,V] logits (TokenScoring.reference)."""
        out.token_logprobs, out.token_entropy = reference_token_scores(
            out.hidden_states, head, input_ids, scoring.score_mask, temperature=scoring.temperature,
            entropy=scoring.entropy)
        if scoring.mtp_loss_mask is not None and out.mtp_hidden_states:
            out.mtp_token_losses, out.mtp_token_correct = reference_mtp_token_scores(
                out.mtp_hidden_states, mtp_head, input_ids, scoring.mtp_loss_mask, loss_type=scoring.mtp_loss_type,
                trunk_hidden=out.hidden_states, trunk_head=head, attention_mask=scoring.attention_mask)
        return out

    def _unique_trunk(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attn: AttnInputs,
                      rows: UniqueTokens) -> torch.Tensor:
        """The trunk on the unique tokens [1,M] of the rows; returns their final-normed hidden states h^0 [M,H]."""
        ids = input_ids.reshape(-1)[rows.unique_index][None]  # [1,M]
        positions = position_ids.expand_as(input_ids).reshape(-1)[rows.unique_index][None]
        x = self.embed_tokens(ids)
        cos, sin = self._rope(positions, x.dtype)
        attn = AttnInputs(cos=cos, sin=sin, mask=attn.mask, is_causal=attn.is_causal, rows=rows)
        for i, layer in enumerate(self.layers):
            x = layer(x, attn, i)
        return self.norm(x)[0]  # [M,H]

    # ----- incremental forward (static KV cache) ------------------------------------------------------
    def new_kv_cache(self, batch_size: int, max_seq_len: int, dtype: torch.dtype | None = None,
                     device: torch.device | str | None = None) -> KVCache:
        """A cache for the trunk layers: [L, batch_size, Hkv, max_seq_len, Dh]; dtype/device default to the model's."""
        return self._new_cache(self.config.num_hidden_layers, batch_size, max_seq_len, dtype, device)

    def new_mtp_kv_cache(self, batch_size: int, max_seq_len: int, dtype: torch.dtype | None = None,
                         device: torch.device | str | None = None) -> KVCache:
        """A cache with one layer per MTP layer (layer index = depth, 0-based)."""
        if self.config.num_mtp_layers == 0:
            raise ValueError("this model has no MTP layers (num_mtp_layers=0); load with num_mtp_layers=D to add them")
        return self._new_cache(self.config.num_mtp_layers, batch_size, max_seq_len, dtype, device)

    def _new_cache(self, num_layers: int, batch_size: int, max_seq_len: int, dtype, device) -> KVCache:
        ref = self.embed_tokens.weight
        return KVCache.empty(num_layers, batch_size, self.config.num_key_value_heads, max_seq_len,
                             self.config.resolved_head_dim, dtype=dtype or ref.dtype, device=device or ref.device)

    def forward_step(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        cache_slots: torch.Tensor,
        kv_cache: KVCache,
        cache_rows: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        *,
        kv_len: int | None = None,
        logit_index: torch.Tensor | None = None,
        prefill: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Trunk on new tokens with a static cache.

        input_ids, position_ids, cache_slots: [B,T] (cache_slots = where each token's K/V goes in its cache row);
        cache_rows: [B] cache row per input row (default arange(B)); attn_mask: [B,T,S] bool, True = query may
        attend key slot s (default: slot <= the query's slot; the query's own slot is always admitted);
        kv_len: read only the first kv_len slots (then attn_mask is [B,T,kv_len]; all slots must be < kv_len);
        logit_index: [B,P] positions along T to compute logits at (default all: a prefill needs only the last);
        prefill: the caller's word that cache_slots are 0..T-1 in every row, kv_len = T and attn_mask None (a
        prompt from slot 0): the packed path then attends with SDPA's is_causal, no mask (trunk.is_prefill; checked
        here, computed with the mask as any step).
        Returns logits [B,T,V] (or [B,P,V]) and final-normed hidden [B,T,H].
        """
        _check_step_shapes(input_ids, position_ids, cache_slots, kv_cache, self.config.num_hidden_layers, "kv_cache")
        _check_prefill(cache_slots, kv_cache, attn_mask, kv_len, prefill)
        x = self.embed_tokens(input_ids)
        cos, sin = self._rope(position_ids, x.dtype)
        attn = step_attn_inputs(cos, sin, kv_cache, cache_slots, cache_rows, attn_mask, kv_len)
        for i, layer in enumerate(self.layers):
            x = layer(x, attn, i)
        hidden = self.norm(x)
        return F.linear(at_positions(hidden, logit_index), self.head_weight()), hidden

    def mtp_step(
        self,
        depth: int,
        prev_hidden: torch.Tensor,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        cache_slots: torch.Tensor,
        mtp_kv_cache: KVCache,
        cache_rows: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        *,
        kv_len: int | None = None,
        logit_index: torch.Tensor | None = None,
        prefill: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One MTP layer (depth 0-based) on new positions with its own cache layer (mtp_kv_cache layer `depth`).

        prev_hidden [B,T,H]: h^{depth} at these positions (the trunk hidden for depth 0);
        input_ids [B,T]: token t_{i+depth+1} for position i; position_ids: the trunk positions i (see mtp.py).
        Other arguments as forward_step (logit_index: the speculative commit needs the logits of each row's
        last position only). Returns logits [B,T,V] ([B,P,V] with logit_index; shared head) and h^{depth+1} [B,T,H].
        """
        if not 0 <= depth < self.config.num_mtp_layers:
            raise ValueError(f"depth={depth} out of range: this model has {self.config.num_mtp_layers} MTP layers")
        _check_step_shapes(input_ids, position_ids, cache_slots, mtp_kv_cache, self.config.num_mtp_layers,
                           "mtp_kv_cache")
        _check_prefill(cache_slots, mtp_kv_cache, attn_mask, kv_len, prefill)
        if prev_hidden.shape[:2] != input_ids.shape:
            raise ValueError(f"prev_hidden {tuple(prev_hidden.shape)} must be [B,T,H] with B,T of input_ids "
                             f"{tuple(input_ids.shape)}")
        tok_emb = self.embed_tokens(input_ids)
        cos, sin = self._rope(position_ids, tok_emb.dtype)
        attn = step_attn_inputs(cos, sin, mtp_kv_cache, cache_slots, cache_rows, attn_mask, kv_len)
        hidden = self.mtp_layers[depth](prev_hidden, tok_emb, attn, depth)
        return F.linear(at_positions(hidden, logit_index), self.head_weight()), hidden

    def mtp_chain(self, depth: int, position_ids: torch.Tensor, cache_slots: torch.Tensor, mtp_kv_cache: KVCache,
                  *, kv_len: int | None = None):
        """n one-token MTP steps of layer `depth`, step i at position_ids[:, i], cache_slots[:, i] ([B,n]) with
        the default mask over kv_len slots. Returns step(i, prev_hidden [B,1,H], input_ids [B,1]) ->
        mtp_step's (logits, hidden). Here simply one mtp_step per call; the packed path (packed.py) builds the
        per-step inputs once for the whole chain."""

        def step(i: int, prev_hidden: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.mtp_step(depth, prev_hidden, input_ids, position_ids[:, i:i + 1], cache_slots[:, i:i + 1],
                                 mtp_kv_cache, kv_len=kv_len)

        return step

    # ----- checkpoints ---------------------------------------------------------------------------------
    def save_pretrained(self, path: str, *, max_shard_bytes: int | None = None) -> None:
        """Write an HF directory (config.json, safetensors, tokenizer files of the source dir); see hf_io."""
        from mtprl.model.hf_io.checkpoint import save_pretrained

        save_pretrained(self, path, max_shard_bytes=max_shard_bytes)


def _check_prefill(cache_slots: torch.Tensor, cache: KVCache, attn_mask: torch.Tensor | None, kv_len: int | None,
                   prefill: bool) -> None:
    if prefill:  # (raises when the step is not one)
        is_prefill(cache_slots, attn_mask, cache.max_seq_len if kv_len is None else kv_len, True)


def at_positions(hidden: torch.Tensor, logit_index: torch.Tensor | None) -> torch.Tensor:
    """hidden [B,T,H] -> [B,P,H] at logit_index [B,P] (all of hidden when None)."""
    if logit_index is None:
        return hidden
    return hidden.gather(1, logit_index[:, :, None].expand(-1, -1, hidden.shape[-1]))


def _check_step_shapes(input_ids: torch.Tensor, position_ids: torch.Tensor, cache_slots: torch.Tensor,
                       cache: KVCache, num_layers: int, cache_name: str) -> None:
    if input_ids.dim() != 2 or position_ids.shape != input_ids.shape or cache_slots.shape != input_ids.shape:
        raise ValueError(
            f"input_ids, position_ids, cache_slots must all be [B,T]; got {tuple(input_ids.shape)}, "
            f"{tuple(position_ids.shape)}, {tuple(cache_slots.shape)}")
    if cache.num_layers != num_layers:
        raise ValueError(f"{cache_name} has {cache.num_layers} layers, the model needs {num_layers} "
                         f"(use new_kv_cache for the trunk, new_mtp_kv_cache for MTP layers)")
