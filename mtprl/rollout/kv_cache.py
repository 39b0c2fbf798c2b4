"""Cache rows and the KV-token budget of the rollout engine.

The engine preallocates, once, a static trunk cache (and an MTP cache when speculating) of R rows x S slots
(gpt-fast style). Row management (vLLM's scheduler, without paging):
  * LIVE ROWS ARE A PREFIX [0, b): every forward runs on a *view* of rows [0, b) (or [b0, b1) for a prefill),
    so the model never gathers cache rows (`cache_rows=None`: no per-step copy of the cache).
  * When sequences finish, the live rows past the new end are moved into the holes (`move_rows`: one copy of
    the valid slots of the moved rows, once per finished sequence), and waiting sequences are admitted at
    the end of the prefix.
  * Slot s of a row holds the K/V of sequence position s; speculative verification writes draft tokens at
    slots past the row's length (tree nodes at their own slots), and `copy_slots` moves an accepted tree
    path's K/V to the slots of its positions.
KV-token budget: a sequence reserves prompt_len + max_new_tokens (capped by max_seq_len) tokens of KV from
admission until it finishes; admission is FIFO and stops at the first sequence that does not fit (no
overtaking: the order of results and of random draws is a deterministic function of the inputs). With a
static cache the budget bounds the live working set (attention reads, memory on a paged back-end); the
physical cache is R x (max_seq_len + speculative slack) slots either way.
Memory plan (`plan_cache`): R = max_num_seqs, or fewer when a byte bound is given (on CUDA a share of the free
memory, on the CPU a configured size): R = floor(bound / (slots x bytes per slot)), bytes per slot = 2 (K, V)
x layers (trunk + MTP when speculating) x Hkv x Dh x dtype size. Fewer rows only lower the concurrency:
waiting sequences are admitted as rows free up.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from mtprl.model import KVCache, ModelConfig
from mtprl.rollout.tree import build_tree
from mtprl.rollout.types import SpeculativeConfig

GiB = 2 ** 30


def rows_view(cache: KVCache, start: int, end: int) -> KVCache:
    """Rows [start, end) of `cache` as a KVCache sharing its storage (writes go to the big cache)."""
    return KVCache(k=cache.k[:, start:end], v=cache.v[:, start:end])


def move_rows(cache: KVCache, src: torch.Tensor, dst: torch.Tensor, num_slots: int) -> None:
    """Copy the first num_slots slots of rows src [M] to rows dst [M] in every layer (gather first, so src and
    dst may overlap)."""
    if src.numel() == 0:
        return
    for t in (cache.k, cache.v):
        t[:, dst, :, :num_slots] = t[:, src, :, :num_slots]


def copy_slots(cache: KVCache, src_slots: torch.Tensor, dst_slots: torch.Tensor) -> None:
    """Within rows [0, b) (b = src_slots.shape[0]): K/V at src_slots [b,M] -> dst_slots [b,M], every layer.
    Gathered first, so a slot may be both a source and a destination."""
    b = src_slots.shape[0]
    rows = torch.arange(b, device=src_slots.device)[:, None]  # [b,1]
    for t in (cache.k, cache.v):
        # advanced indices on dims 1 and 3 around a slice: the indexed view is [b, M, L, Hkv, Dh] on both sides
        t[:, rows, :, dst_slots] = t[:, rows, :, src_slots]


@dataclass
class RowState:
    """Per-row tensors moved together with the cache rows (first dim = row). Subclasses add fields."""

    def move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        if src.numel() == 0:
            return
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value[dst] = value[src]


@dataclass
class DecodeRows(RowState):
    """What the engine knows about each row (R rows; only the live prefix is meaningful).

    tokens [R,S] long: the sequence (prompt then generated), position-indexed.
    logprobs, trunk_logprobs [R,S] float32: of the token at that position (generated positions only).
    lengths [R] long: committed length L (the token at L-1 is sampled but not yet fed to the trunk).
    prompt_lens [R], limits [R] (max total length), seq_ids [R] (index into the expanded request list).
    """

    tokens: torch.Tensor
    logprobs: torch.Tensor
    trunk_logprobs: torch.Tensor
    lengths: torch.Tensor
    prompt_lens: torch.Tensor
    limits: torch.Tensor
    seq_ids: torch.Tensor

    @classmethod
    def empty(cls, num_rows: int, num_slots: int, device: torch.device) -> "DecodeRows":
        def z(*shape, dtype=torch.long):
            return torch.zeros(*shape, dtype=dtype, device=device)
        return cls(tokens=z(num_rows, num_slots), logprobs=z(num_rows, num_slots, dtype=torch.float32),
                   trunk_logprobs=z(num_rows, num_slots, dtype=torch.float32), lengths=z(num_rows),
                   prompt_lens=z(num_rows), limits=z(num_rows), seq_ids=z(num_rows))


class KVBudget:
    """Tokens of KV reserved by live sequences (host-side integer bookkeeping)."""

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError(f"kv_token_budget must be > 0, got {capacity}")
        self.capacity = capacity
        self.used = 0

    def fits(self, tokens: int) -> bool:
        return self.used + tokens <= self.capacity

    def reserve(self, tokens: int) -> None:
        if not self.fits(tokens):
            raise RuntimeError(f"KV budget overflow: {self.used} + {tokens} > {self.capacity}")
        self.used += tokens

    def release(self, tokens: int) -> None:
        self.used -= tokens
        if self.used < 0:
            raise RuntimeError("KV budget released more than reserved")


def compaction_moves(finished: list[bool]) -> tuple[list[int], list[int], int]:
    """Live rows [0, b) with finished flags -> (src rows, dst rows, new b): live rows at index >= new b move into
    finished rows at index < new b, in increasing order (deterministic)."""
    b = len(finished)
    new_b = b - sum(finished)
    holes = [r for r in range(new_b) if finished[r]]
    movers = [r for r in range(new_b, b) if not finished[r]]
    assert len(holes) == len(movers)
    return movers, holes, new_b


@dataclass(frozen=True)
class KVCachePlan:
    """The static KV cache an engine allocates.

    rows: cache rows = sequences decoded at once (<= max_num_seqs; fewer when the bound allows fewer).
    slots: slots per row (max_seq_len + speculative slack).
    bytes_per_slot: K and V of one slot over every cached layer (trunk, plus MTP when speculating).
    limit_bytes: the bound the cache had to fit (None = none: max_num_seqs rows).
    """

    rows: int
    slots: int
    bytes_per_slot: int
    limit_bytes: int | None
    row_bytes: int = 0  # what each row costs beyond its slots (engine_row_bytes)

    @property
    def tokens(self) -> int:
        return self.rows * self.slots

    @property
    def bytes(self) -> int:
        """The KV cache and its per-row companions (what the bound counts)."""
        return self.tokens * self.bytes_per_slot + self.rows * self.row_bytes

    def describe(self) -> str:
        """One line: rows, tokens, size (and the bound)."""
        bound = "" if self.limit_bytes is None else f" of {_size(self.limit_bytes)} allowed"
        return f"KV cache: {self.rows} rows x {self.slots} slots = {self.tokens} tokens, {_size(self.bytes)}{bound}"


def _size(num_bytes: int) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.2f} {unit}"
    return f"{num_bytes} B"


def kv_bytes_per_slot(config: ModelConfig, dtype: torch.dtype, with_mtp: bool, with_history: bool = False) -> int:
    """2 (K, V) x cached layers x Hkv x Dh x bytes per element; with_history adds one trunk hidden state per slot
    (hidden_size elements: adaptive speculation keeps the trunk's last hidden state of every position the MTP
    layers have not seen yet)."""
    layers = config.num_hidden_layers + (config.num_mtp_layers if with_mtp else 0)
    history = config.hidden_size if with_history else 0
    return (2 * layers * config.num_key_value_heads * config.resolved_head_dim + history) * dtype.itemsize


def engine_row_bytes(config: ModelConfig, dtype: torch.dtype, num_slots: int, with_mtp: bool, scored: int = 1) -> int:
    """What one cache row costs the engine beyond its K/V slots: DecodeRows (token ids and two fp32 logprob rows,
    16 B a slot); with MTP layers SpecRows' draft logits [V] and stored hidden states [D, H] in dtype; and the
    decode step's temporaries for the row's `scored` positions (1 plain, the draft tree's nodes when
    speculating): their logits in dtype and three fp32 [V] rows each (log-probs, probabilities, the drafts')."""
    v = config.vocab_size
    spec_rows = (v + config.num_mtp_layers * config.hidden_size) * dtype.itemsize if with_mtp else 0
    return 16 * num_slots + spec_rows + scored * v * (dtype.itemsize + 12)


def plan_cache(config: ModelConfig, *, max_num_seqs: int, num_slots: int, dtype: torch.dtype, with_mtp: bool,
               limit_bytes: int | None, limit_name: str = "kv_cache_bytes", with_history: bool = False,
               scored: int = 1) -> KVCachePlan:
    """rows = min(max_num_seqs, floor(limit_bytes / (num_slots x bytes per slot + the row's other bytes))); a
    ValueError naming limit_name when not even one row fits. with_history: adaptive speculation's hidden-state
    history is part of the bound (kv_bytes_per_slot); scored: positions a decode step scores per row
    (engine_row_bytes)."""
    per_slot = kv_bytes_per_slot(config, dtype, with_mtp, with_history)
    row_bytes = engine_row_bytes(config, dtype, num_slots, with_mtp, scored)
    rows = max_num_seqs
    if limit_bytes is not None:
        rows = min(max_num_seqs, limit_bytes // (num_slots * per_slot + row_bytes))
        if rows < 1:
            raise ValueError(
                f"{limit_name}: one KV cache row of {num_slots} slots "
                f"({(num_slots * per_slot + row_bytes) / GiB:.3f} GiB) does not fit the {limit_bytes / GiB:.3f} GiB "
                "allowed; allow more memory or lower max_seq_len")
    return KVCachePlan(rows=rows, slots=num_slots, bytes_per_slot=per_slot, limit_bytes=limit_bytes,
                       row_bytes=row_bytes)


def cache_slots(max_seq_len: int, spec: SpeculativeConfig | None) -> int:
    """Slots per cache row: max_seq_len + 2, and when speculating the draft tree's nodes + 1 more (verification
    writes the tree's nodes at slots past a row's length)."""
    if spec is None:
        return max_seq_len + 2
    return max_seq_len + 3 + build_tree(spec.num_steps, spec.eagle_topk, spec.num_draft_tokens).num_nodes


def draft_nodes(spec: SpeculativeConfig | None) -> int:
    """Positions a decode step scores per row: the draft tree's nodes when speculating, else 1."""
    return 1 if spec is None else build_tree(spec.num_steps, spec.eagle_topk, spec.num_draft_tokens).num_nodes


def plan_engine_cache(config: ModelConfig, spec: SpeculativeConfig | None, max_seq_len: int, *, max_num_seqs: int,
                      dtype: torch.dtype, limit_bytes: int | None, limit_name: str = "kv_cache_bytes") -> KVCachePlan:
    """plan_cache for an engine generating with `spec` (None: plain decoding): its slots (cache_slots), the MTP
    layers' cache and adaptive speculation's history when speculating, and the rows' scored positions."""
    return plan_cache(config, max_num_seqs=max_num_seqs, num_slots=cache_slots(max_seq_len, spec), dtype=dtype,
                      with_mtp=spec is not None, limit_bytes=limit_bytes, limit_name=limit_name,
                      with_history=spec is not None and spec.adaptive, scored=draft_nodes(spec))
