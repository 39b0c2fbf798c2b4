"""Padding, micro-batch splitting (fixed size or token budget), shared prompts, per-token log-probabilities.

Sequence layout everywhere in the trainer: ``[prompt tokens][response tokens][padding]`` (right
padding), positions ``0..len-1``; masks say what 1 means (``attention_mask``: real token,
``loss_mask`` / ``response_mask``: a token the loss is taken on). Log-probabilities are stored on
the token they score: ``logprobs[:, t] = log p(token_t | tokens_<t)``, 0 at ``t = 0``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from mtprl.model.trunk import UniqueTokens


def pad_right(seqs: Sequence[Sequence[int]], pad_value: int, width: int | None = None) -> torch.Tensor:
    """[B,T] long tensor; rows right-padded with ``pad_value`` to ``width`` (default: the longest row)."""
    width = max((len(s) for s in seqs), default=0) if width is None else width
    out = torch.full((len(seqs), width), pad_value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
    return out


def split_fixed(num: int, micro_size: int | None) -> list[list[int]]:
    """Consecutive index groups of ``micro_size`` (the whole batch when None)."""
    size = num if not micro_size else micro_size
    return [list(range(i, min(i + size, num))) for i in range(0, num, size)]


def split_by_tokens(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Pack sequences into micro-batches whose padded size ``len(group) * max(len)`` stays within
    ``max_tokens`` (verl's use_dynamic_bsz). Longest first, first fit; every group is non-empty, and a
    sequence longer than the budget gets a group of its own (the config check prevents that)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    widths: list[int] = []
    for i in order:
        for g, group in enumerate(groups):
            if (len(group) + 1) * max(widths[g], lengths[i]) <= max_tokens:
                group.append(i)
                widths[g] = max(widths[g], lengths[i])
                break
        else:
            groups.append([i])
            widths.append(lengths[i])
    return [sorted(g) for g in groups]


def trim_padding(*tensors: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Drop trailing columns that are padding in every row (``use_remove_padding``)."""
    width = int(attention_mask.sum(-1).max().item()) if attention_mask.numel() else 0
    return tuple(t[:, :width] for t in tensors)


def shared_prompt_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor,
                         group_ids: torch.Tensor) -> UniqueTokens | None:
    """The unique tokens of right-padded rows [N,T] (verl's ``use_prefix_grouper``): the samples of a group
    share their prompt (the tokens before the first response token), so its tokens are computed once, by the
    group's first row; every other row contributes its response tokens; padding contributes nothing. Rows whose
    prompt differs from their group's first row (none in an RL batch) keep their own. None when a row is not
    right-padded (the layout this relies on)."""
    n, t = input_ids.shape
    lengths = attention_mask.sum(-1)
    if not bool((attention_mask.bool() == (torch.arange(t, device=lengths.device) < lengths[:, None])).all()):
        return None
    has_resp = response_mask.bool().any(-1)
    starts = torch.where(has_resp, response_mask.long().argmax(-1), lengths).tolist()
    lengths, ids, gids = lengths.tolist(), input_ids.tolist(), group_ids.tolist()
    leaders: dict[tuple, int] = {}
    base = [0] * n  # index into the unique tokens of row i's first own token
    unique: list[int] = []
    expand = torch.zeros(n, t, dtype=torch.long)
    for i in range(n):
        lead = leaders.setdefault((gids[i], tuple(ids[i][:starts[i]])), i)
        own = 0 if lead == i else starts[i]  # slots before `own` are the leader's (the same tokens and positions)
        base[i] = len(unique) - own
        unique.extend(range(i * t + own, i * t + lengths[i]))
        expand[i, :own] = torch.arange(base[lead], base[lead] + own)
        expand[i, own:lengths[i]] = torch.arange(base[i] + own, base[i] + lengths[i])
    device = input_ids.device
    return UniqueTokens(unique_index=torch.tensor(unique, dtype=torch.long, device=device),
                        expand_index=expand.to(device))


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """logits [B,T,V], input_ids [B,T] -> [B,T] with out[:, t] = log_softmax(logits[:, t-1] / T)[input_ids[:, t]]
    and out[:, 0] = 0. Computed in fp32. (The reference of mtprl.model.head.logits_token_scores; the trainer scores
    tokens through the chunked head.)"""
    logits = logits[:, :-1].float()
    if temperature not in (0.0, 1.0):
        logits = logits / temperature
    logp = torch.log_softmax(logits, dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return F.pad(logp, (1, 0))


def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """[B,T] entropy of the next-token distribution, aligned like token_logprobs (out[:, t] from logits[:, t-1])."""
    logits = logits[:, :-1].float()
    if temperature not in (0.0, 1.0):
        logits = logits / temperature
    logp = torch.log_softmax(logits, dim=-1)
    return F.pad(-(logp.exp() * logp).sum(-1), (1, 0))
