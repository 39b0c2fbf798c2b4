"""Speculative decoding with the policy's own MTP layers as the drafter (exact: see acceptance.py).

Papers: Leviathan et al. 2023 / Chen et al. 2023 (draft-then-verify, exact rejection sampling); DeepSeek-V3
§2.2 and MiMo-7B §2 (MTP layers: depth k at position i reads h^{k-1}_i and Emb(t_{i+k}), predicts t_{i+k+1});
EAGLE (Li et al. 2024: a draft layer reused recursively on its own hidden state, tree drafts); SpecInfer
(tree verification with a tree attention mask in one forward).

Notation. A row has COMMITTED length L: tokens t_0..t_{L-1}; the trunk has processed t_0..t_{L-2} (the token
t_{L-1} was sampled and is the root of the next draft tree). Invariants between steps, per row:
  * trunk cache slots 0..L-2 hold true K/V;
  * MTP layer k (1..D) cache slots 0..L-1-k hold true K/V (inputs h^{k-1}_j and t_{j+k} both committed);
  * stored_h[k] = h^k_{L-1-k} (its last true hidden) and q_root = head(h^1_{L-2}), the draft logits of
    t_L (computed for free by the commit of the previous step).
Slots past these are stale and never read (the default mask admits key slot <= query slot, tree masks admit
committed slots and the query's ancestors, and every stale slot is rewritten before any query reaches it).

One step (the draft tree has nodes 0..N-1 in breadth-first order, node 0 = the root t_{L-1}):
 1. DRAFT. Children of the root come from q_root. For a node n at depth e the MTP input is at position
    p_k(n) = L - k - 1 + e in layer k's cache, slot L - k + (n - 1) (siblings: same position, own slots):
      * depths k = 2..D (DeepSeek-style): layer k runs on every node of depth 1..k-1, its input hidden for
        node n being layer k-1's output at parent(n) (stored_h[k-1] for the root); the outputs at depth k-1
        give the draft distributions of depth-k children. This is exactly the full-sequence MTP path on the
        drafted sequence (test: draft logits == model(seq).mtp_logits);
      * deeper than D (EAGLE-style recursion): layer D runs on the nodes of depth e >= D with input hidden =
        its own output at parent(n) (stored_h[D] for the root), one forward per level.
    Children are drawn WITHOUT replacement from the processed draft distribution (same temperature / top-k /
    top-p as the target); greedy: the top-k tokens of the draft logits.
 2. VERIFY. One trunk forward over the N nodes (positions L-1+depth, slots L-1+n, tree attention mask).
 3. ACCEPT (acceptance.py): a accepted drafts along a path + 1 token from the residual / bonus.
 4. COMMIT. Tree: the accepted path's trunk K/V are copied to the slots of their positions. MTP caches are
    re-run on the a+1 newly committed positions from the TRUE trunk hidden states of the verification
    (layer 1 at positions L-1..L-1+a, layer k at L-k..L-k+a, padded to the tree depth + 1 for the batch);
    the last output of layer 1 is q_root of the next step. The same commit, with L_old = 1, prefills the MTP
    caches over a prompt (MTP input positions < 0 are written to a scratch slot and never read).
The returned logprobs are the trunk's (from the verification logits), as plain decoding gives.

Where we differ: SGLang/vLLM's EAGLE trees re-rank nodes by draft scores (EAGLE-2), which at temperature > 0
is not exact; our tree shape is static (tree.py). Adaptive depth (AdaptiveDepth) is ours.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mtprl.model import KVCache
from mtprl.rollout.acceptance import chain_accept, greedy_chain_accept, greedy_tree_accept, tree_accept
from mtprl.rollout.kv_cache import RowState, copy_slots
from mtprl.rollout.sampling import (processed_logprobs, sample_from_probs, sample_without_replacement,
                                   temperature_logprobs, uniform_noise)
from mtprl.rollout.tree import DraftTree, TreeTensors
from mtprl.rollout.types import SamplingParams


@dataclass
class SpecRows(RowState):
    """Speculative per-row state (first dim = cache row).

    q_root_logits [R,V]: draft logits of t_L (layer 1 at position L-2).
    stored_h [R,D,H]: stored_h[:, k-1] = h^k at position mtp_len-1-k (layer k's last true hidden).
    mtp_lengths [R]: the committed length the MTP state is synced to (< lengths only in adaptive mode after
        plain steps; the gap is caught up from `hist` before the next speculative step).
    hist [R,W,H]: ring buffer of trunk hidden states by position (position p at p % W), adaptive mode only.
    """

    q_root_logits: torch.Tensor
    stored_h: torch.Tensor
    mtp_lengths: torch.Tensor
    hist: torch.Tensor

    @classmethod
    def empty(cls, num_rows: int, vocab: int, num_mtp: int, hidden: int, hist_len: int, dtype: torch.dtype,
              device: torch.device) -> "SpecRows":
        return cls(q_root_logits=torch.zeros(num_rows, vocab, dtype=dtype, device=device),
                   stored_h=torch.zeros(num_rows, num_mtp, hidden, dtype=dtype, device=device),
                   mtp_lengths=torch.zeros(num_rows, dtype=torch.long, device=device),
                   hist=torch.zeros(num_rows, hist_len, hidden, dtype=dtype, device=device))


@dataclass
class StepCounters:
    """Forward counts, accumulated over a generate call."""

    trunk_forwards: int = 0
    mtp_forwards: int = 0


@dataclass
class SpecStepOutput:
    """tokens [b,M+1]: accepted drafts then the residual/bonus token (first num_new valid);
    num_new [b] = accepted + 1; logprobs / trunk_logprobs [b,M+1] of those tokens (see types.py);
    reached / accepted [M] (device): per depth j, rows that tested a draft at depth j / accepted one."""

    tokens: torch.Tensor
    num_new: torch.Tensor
    logprobs: torch.Tensor
    trunk_logprobs: torch.Tensor
    reached: torch.Tensor
    accepted: torch.Tensor


def length_range(lengths: torch.Tensor) -> tuple[int, int]:
    """(min, max) of `lengths` on the host: a device sync. The engine passes its host-side shadow instead."""
    low, high = torch.aminmax(lengths)
    return int(low), int(high)


def _place(positions: torch.Tensor, slots: torch.Tensor, slot_range: tuple[int, int]
           ) -> tuple[torch.Tensor, torch.Tensor, int, int | None]:
    """Map negative MTP input positions (before the sequence start) to a scratch slot one past the largest real
    slot of the call. slot_range: (min, max) of `slots`, known on the host (no device sync). Returns positions
    clamped at 0, slots, kv_len and the scratch slot (None if unused).

    The scratch slot holds no true K/V of any row: a row's true slots in layer k lie below every slot the call
    writes for it. When EVERY slot is negative (prompts shorter than the layer's depth,
    e.g. a 1-token prompt's prefill commit with D >= 2) the layer holds no true K/V in any row, so the scratch
    slot is 0 (kv_len 1) rather than max_slot + 1 < 1."""
    min_slot, max_slot = slot_range
    if min_slot >= 0:  # (a tree node's position may still be < 0 when the row is that short: clamp)
        return positions.clamp(min=0), slots, max_slot + 1, None
    scratch = max(max_slot, -1) + 1
    return positions.clamp(min=0), torch.where(slots < 0, scratch, slots), scratch + 1, scratch


def tree_attn_mask(base: torch.Tensor, region_anc: torch.Tensor, kv_len: int, scratch: int | None) -> torch.Tensor:
    """[b,T,kv_len] bool: key slot s is visible to query t iff s < base (committed) or s = base + m with
    region_anc[t, m] (m-th tree entry is an ancestor-or-self of query t). base [b], region_anc [T,M]."""
    t, m = region_anc.shape
    s = torch.arange(kv_len, device=base.device)
    rel = s[None, :] - base[:, None]  # [b,S]
    in_region = (rel >= 0) & (rel < m)
    anc = region_anc[:, rel.clamp(0, m - 1)].permute(1, 0, 2)  # [b,T,S]
    mask = (rel < 0)[:, None, :] | (in_region[:, None, :] & anc)
    if scratch is not None:
        mask[:, :, scratch] = False
    return mask


@dataclass
class Draft:
    """A drafted tree for b rows: node_tokens [b,N] (node 0 = root), node_valid [b,N] (False = drawn outside the
    draft's support), logits [b,N,V] raw draft logits of each node's children (leaves: zeros), probs [b,N,V]
    the processed draft distributions the children were drawn from (leaves: zeros; None when greedy)."""

    node_tokens: torch.Tensor
    node_valid: torch.Tensor
    logits: torch.Tensor
    probs: torch.Tensor | None


@dataclass
class _DraftCtx:
    """Everything the drafting helpers share for one step (b live rows, N tree nodes)."""

    model: torch.nn.Module
    tree: DraftTree
    tt: TreeTensors
    mtp: KVCache
    lengths: torch.Tensor  # [b]
    len_range: tuple[int, int]  # (min, max) of lengths, on the host
    node_tokens: torch.Tensor  # [b,N]
    counters: StepCounters
    hbuf: dict[int, torch.Tensor] = field(default_factory=dict)  # layer k -> [b,N,H] outputs per node


def _mtp_on_nodes(ctx: _DraftCtx, k: int, nodes: range, hidden_src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run MTP layer k (1-based) on tree `nodes` (contiguous ids >= 1): input hidden = hidden_src[:, parent],
    token = the node's token, position L-k-1+depth, slot L-k+node-1. Returns logits [b,T,V], hidden [b,T,H]."""
    start, stop = nodes.start, nodes.stop
    base = ctx.lengths[:, None] - k
    positions = base - 1 + ctx.tt.depths[None, start:stop]
    slots = base + (ctx.tt.node_ids[None, start:stop] - 1)
    low, high = ctx.len_range
    positions, slots, kv_len, scratch = _place(positions, slots, (low - k + start - 1, high - k + stop - 2))
    mask = None
    if not ctx.tree.is_chain:
        mask = tree_attn_mask(ctx.lengths - k, ctx.tt.ancestors[start:stop, 1:], kv_len, scratch)
    hidden_in = hidden_src.index_select(1, ctx.tt.parents[start:stop])
    ctx.counters.mtp_forwards += 1
    return ctx.model.mtp_step(k - 1, hidden_in, ctx.node_tokens[:, start:stop], positions, slots, ctx.mtp,
                              attn_mask=mask, kv_len=kv_len)


def _sample_children(ctx: _DraftCtx, level: int, q_logits: torch.Tensor, draft: Draft, params: SamplingParams,
                     generator: torch.Generator | None) -> None:
    """Draw the children of the level-`level` nodes from their draft logits q_logits [b,P,V] (P = nodes of the
    level, in order); fills node_tokens / node_valid of level+1 and the parents' logits / probs."""
    start, end = ctx.tree.level_ranges[level]
    draft.logits[:, start:end] = q_logits
    kids = ctx.tt.level_children[level]
    if kids is None:
        return
    if params.greedy:
        tokens = q_logits.argmax(-1, keepdim=True) if kids.num == 1 else q_logits.topk(kids.num, dim=-1).indices
        ctx.node_tokens[:, kids.child] = tokens[:, kids.parent_pos, kids.rank]
        return
    probs = processed_logprobs(q_logits, params).exp()  # [b,P,V]
    draft.probs[:, start:end] = probs
    if kids.num == 1:  # one child per parent: a plain sample (always inside the support)
        tokens = sample_from_probs(probs, generator)[..., None]  # [b,P,1]
        ctx.node_tokens[:, kids.child] = tokens[:, kids.parent_pos, kids.rank]
        return
    tokens, valid = sample_without_replacement(probs, kids.num, generator)  # [b,P,num]
    ctx.node_tokens[:, kids.child] = tokens[:, kids.parent_pos, kids.rank]
    draft.node_valid[:, kids.child] = valid[:, kids.parent_pos, kids.rank]


def draft_tree(model: torch.nn.Module, tree: DraftTree, tt: TreeTensors, mtp: KVCache, lengths: torch.Tensor,
               root_tokens: torch.Tensor, spec_rows: SpecRows, b: int, params: SamplingParams,
               generator: torch.Generator | None, counters: StepCounters,
               len_range: tuple[int, int] | None = None) -> Draft:
    """Step 1 (module docstring) for live rows [0, b). len_range: (min, max) of lengths if known on the host
    (None: read from the device, a sync)."""
    n, num_mtp = tree.num_nodes, model.config.num_mtp_layers
    device = lengths.device
    node_tokens = torch.zeros(b, n, dtype=torch.long, device=device)
    node_tokens[:, 0] = root_tokens
    q_root = spec_rows.q_root_logits[:b]
    draft = Draft(node_tokens=node_tokens, node_valid=torch.ones(b, n, dtype=torch.bool, device=device),
                  logits=q_root.new_zeros(b, n, q_root.shape[1]),
                  probs=None if params.greedy else torch.zeros(b, n, q_root.shape[1], device=device))
    ctx = _DraftCtx(model, tree, tt, mtp, lengths, length_range(lengths) if len_range is None else len_range,
                    node_tokens, counters)
    stored = spec_rows.stored_h[:b]
    for k in range(1, num_mtp + 1):
        buf = torch.zeros(b, n, stored.shape[-1], dtype=stored.dtype, device=device)
        buf[:, 0] = stored[:, k - 1]
        ctx.hbuf[k] = buf
    q_level = q_root[:, None]  # [b,1,V] draft logits of the root's children
    for level in range(tree.max_depth):
        if tree.is_chain and level + 2 > num_mtp:  # the rest is a chain of EAGLE-style recursions
            _draft_chain_tail(ctx, level, q_level[:, 0], draft, params, generator)
            break
        _sample_children(ctx, level, q_level, draft, params, generator)
        if level + 1 == tree.max_depth:
            break
        k = level + 2  # depth of the tokens drafted next (children of level+1 nodes)
        start, end = tree.level_ranges[level + 1]
        if k <= num_mtp:  # DeepSeek-style: layer k over every node of depth 1..k-1
            logits, hidden = _mtp_on_nodes(ctx, k, range(1, end), ctx.hbuf[k - 1])
            ctx.hbuf[k][:, 1:end] = hidden
            q_level = logits[:, start - 1:end - 1]
        else:  # EAGLE-style recursion of the last layer over this level
            logits, hidden = _mtp_on_nodes(ctx, num_mtp, range(start, end), ctx.hbuf[num_mtp])
            ctx.hbuf[num_mtp][:, start:end] = hidden
            q_level = logits
    return draft


def _draft_chain_tail(ctx: _DraftCtx, first: int, q: torch.Tensor, draft: Draft, params: SamplingParams,
                      generator: torch.Generator | None) -> None:
    """A chain from node `first` on, once every remaining draft is a recursion of the last MTP layer D: sample
    node first+1 from q [b,V] (its draft logits), run layer D on it (input hidden = layer D's output at its
    parent), sample node first+2 from the result, ... to the chain's end. The same forwards and distributions
    as the level loop of draft_tree, cheaper: the MTP steps go through the model's `mtp_chain` (per-level
    inputs built once; chain node e has position = slot = L-D-1+e) and the uniforms of every level are drawn
    at once (so the random stream differs from the level loop's; exactness does not depend on it)."""
    model, lengths, tokens = ctx.model, ctx.lengths, ctx.node_tokens
    num_mtp, last = model.config.num_mtp_layers, ctx.tree.max_depth  # nodes first+1 .. last get drafted
    nodes = torch.arange(first + 1, last, device=lengths.device)  # the nodes layer D runs on
    step = None
    if nodes.numel():
        positions = lengths[:, None] - num_mtp - 1 + nodes[None]  # >= L-1 >= 0: no scratch slot needed
        kv_len = ctx.len_range[1] - num_mtp + last - 1  # one past the largest slot
        step = model.mtp_chain(num_mtp - 1, positions, positions, ctx.mtp, kv_len=kv_len)
    uniforms = None if params.greedy else uniform_noise((tokens.shape[0], last - first), generator, lengths.device)
    hidden = ctx.hbuf[num_mtp][:, first:first + 1]
    for e in range(first, last):  # q: draft logits of node e+1
        draft.logits[:, e] = q
        if params.greedy:
            tokens[:, e + 1] = q.argmax(-1)
        else:
            probs = draft.probs[:, e]
            torch.exp(processed_logprobs(q, params), out=probs)
            tokens[:, e + 1] = sample_from_probs(probs, None, uniforms[:, e - first, None])
        if e + 1 == last:
            break
        ctx.counters.mtp_forwards += 1
        logits, hidden = step(e - first, hidden, tokens[:, e + 1:e + 2])
        q = logits[:, 0]


def verify_and_accept(model: torch.nn.Module, tree: DraftTree, tt: TreeTensors, trunk: KVCache,
                      lengths: torch.Tensor, draft: Draft, params: SamplingParams, generator: torch.Generator | None,
                      counters: StepCounters, max_length: int | None = None
                      ) -> tuple[SpecStepOutput, torch.Tensor, torch.Tensor]:
    """Steps 2-4a: trunk forward over the tree, exact acceptance, tree K/V compaction of the trunk cache.
    Returns the step output, the path with the root [b,M+1] (node ids) and the trunk hidden [b,N,H].
    max_length: max of lengths if known on the host (None: read from the device, a sync)."""
    node_tokens, node_valid, draft_probs = draft.node_tokens, draft.node_valid, draft.probs
    b, n = node_tokens.shape
    m = tree.max_depth
    node_ids = torch.arange(n, device=lengths.device)
    positions = lengths[:, None] - 1 + tt.depths[None]
    slots = lengths[:, None] - 1 + node_ids[None]
    kv_len = (length_range(lengths)[1] if max_length is None else max_length) - 1 + n
    mask = None if tree.is_chain else tree_attn_mask(lengths - 1, tt.ancestors, kv_len, None)
    logits, hidden = model.forward_step(node_tokens, positions, slots, trunk, attn_mask=mask, kv_len=kv_len)
    counters.trunk_forwards += 1
    rows = torch.arange(b, device=lengths.device)
    if tree.is_chain:
        if params.greedy:
            num_acc, tokens = greedy_chain_accept(logits.argmax(-1), node_tokens[:, 1:])
        else:
            target_lp = processed_logprobs(logits, params)
            num_acc, tokens = chain_accept(target_lp.exp(), draft_probs, node_tokens[:, 1:], generator)  # leaf row 0
        path = node_ids[None].expand(b, n)
    else:
        if params.greedy:
            num_acc, path, tokens = greedy_tree_accept(tt, logits.argmax(-1), node_tokens)
        else:
            target_lp = processed_logprobs(logits, params)
            num_acc, path, tokens = tree_accept(tt, target_lp.exp(), draft_probs, node_tokens, node_valid,
                                                generator)
        path = torch.cat([torch.zeros_like(path[:, :1]), path], dim=1)  # [b,M+1] root first
        dst = lengths[:, None] - 1 + torch.arange(1, m + 1, device=lengths.device)[None]
        copy_slots(trunk, lengths[:, None] - 1 + path[:, 1:], dst)
    untruncated = not params.greedy and params.top_k == 0 and params.top_p == 1.0
    if untruncated:  # the processed distribution IS log_softmax(logits / T): reuse it
        on_path = target_lp if tree.is_chain else target_lp[rows[:, None], path]
        trunk_lp = lp = on_path.gather(-1, tokens[..., None]).squeeze(-1)
    else:
        path_logits = logits if tree.is_chain else logits[rows[:, None], path]  # [b,M+1,V]
        trunk_lp = temperature_logprobs(path_logits, params.temperature).gather(-1, tokens[..., None]).squeeze(-1)
        if params.greedy:
            lp = torch.zeros_like(trunk_lp)
        else:
            on_path = target_lp if tree.is_chain else target_lp[rows[:, None], path]
            lp = on_path.gather(-1, tokens[..., None]).squeeze(-1)
    depth_j = torch.arange(1, m + 1, device=lengths.device)
    has_kids = tt.children[path[:, :m], 0] >= 0  # [b,M] the level j-1 node of the path has children
    reached = ((num_acc[:, None] >= depth_j - 1) & has_kids).sum(0)
    accepted = (num_acc[:, None] >= depth_j).sum(0)
    out = SpecStepOutput(tokens=tokens, num_new=num_acc + 1, logprobs=lp, trunk_logprobs=trunk_lp,
                         reached=reached, accepted=accepted)
    return out, path, hidden


def commit_mtp(model: torch.nn.Module, mtp: KVCache, l_old: torch.Tensor, hidden: torch.Tensor, new_tokens: torch.Tensor,
               num_new: torch.Tensor, spec_rows: SpecRows, b: int, counters: StepCounters, *,
               may_be_empty: bool = False, l_range: tuple[int, int] | None = None, prefill: bool = False) -> None:
    """Step 4b for rows [0, b): run MTP layers 1..D on the num_new [b] newly committed positions of each row.

    l_old [b]: committed length before; hidden [b,T,H]: true trunk hidden at positions l_old-1 .. l_old-2+T;
    new_tokens [b,T]: t_{l_old} .. t_{l_old+T-1}. Entries past num_new are padding (garbage written past the
    valid end). With may_be_empty, rows with num_new == 0 keep their state. Updates spec_rows.q_root_logits /
    stored_h in place. l_range: (min, max) of l_old if known on the host (None: read from the device, a sync).
    prefill: every l_old is 1 (a prompt committed from its start): layer 1's step is a prefill, plain causal
    attention over its own positions (forward_step's prefill; deeper layers start at the scratch slot).
    """
    t = hidden.shape[1]
    rows = torch.arange(b, device=l_old.device)
    last = (num_new - 1).clamp(min=0)
    keep = (num_new == 0)[:, None] if may_be_empty else None
    num_mtp = model.config.num_mtp_layers
    old_h = spec_rows.stored_h[:b].clone() if (num_mtp > 1 or may_be_empty) else None
    prev = hidden
    offsets = torch.arange(t, device=l_old.device)[None]
    low, high = length_range(l_old) if l_range is None else l_range
    for k in range(1, num_mtp + 1):
        positions = l_old[:, None] - k + offsets
        positions, slots, kv_len, _ = _place(positions, positions, (low - k, high - k + t - 1))
        hidden_in = prev if k == 1 else torch.cat([old_h[:, k - 2, None], prev[:, :t - 1]], dim=1)
        # the head only at each row's last new position (layer 1's: the next step's q_root; deeper layers' logits
        # are not read): a catch-up after plain steps commits tens of positions per row
        logits, prev = model.mtp_step(k - 1, hidden_in, new_tokens, positions, slots, mtp, kv_len=kv_len,
                                      logit_index=last[:, None], prefill=prefill and k == 1)
        counters.mtp_forwards += 1
        new_h = prev[rows, last]
        if keep is not None:
            new_h = torch.where(keep, old_h[:, k - 1], new_h)
        spec_rows.stored_h[:b, k - 1] = new_h
        if k == 1:
            q = logits[:, 0].to(spec_rows.q_root_logits.dtype)
            if keep is not None:
                q = torch.where(keep, spec_rows.q_root_logits[:b], q)
            spec_rows.q_root_logits[:b] = q
