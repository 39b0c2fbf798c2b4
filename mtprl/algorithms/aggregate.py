"""Loss aggregation: a per-token loss matrix [B,T] and a mask -> one scalar.

Papers: DAPO (Yu et al. 2025, arXiv:2503.14476, eq. 8, "token-level policy gradient loss") and
Dr. GRPO (Liu et al. 2025, arXiv:2503.20783, constant length normaliser). With mask M [B,T] and the
set S of sequences whose mask is not all zero:

    token-mean               Σ_{b,t} ℓ M / Σ_{b,t} M
    seq-mean-token-sum       1/|S| Σ_{b∈S} Σ_t ℓ M
    seq-mean-token-mean      1/|S| Σ_{b∈S} (Σ_t ℓ M / Σ_t M)
    seq-mean-token-sum-norm  1/|S| Σ_{b∈S} Σ_t ℓ M / T       (T = mask width, or loss_scale_factor)

Where we differ from verl ``agg_loss``:
  * sequences with an all-zero mask are left out of every seq-mean (verl counts them in the
    denominator, and seq-mean-token-mean divides 0 by 0 for them);
  * an all-zero mask gives 0 (with a graph to ``loss_mat``), never NaN;
  * masked-out entries are dropped with ``where`` so NaN/inf padding never leaks in;
  * seq-mean-token-sum-norm is a mean over sequences, as SPEC §4 writes it (verl sums over
    sequences and divides by T only);
  * data parallelism: ``global_num_tokens`` / ``global_num_seqs`` replace the local denominators so
    that summing the per-micro-batch losses over all micro-batches and ranks gives the mean over the
    global batch. ``count_normalisers`` gives the local counts to all-reduce.
"""

from __future__ import annotations

import torch

from mtprl.algorithms.registry import Registry

__all__ = ["LOSS_AGG_MODES", "aggregate_loss", "count_normalisers"]

# Each mode: (loss_mat [B,T] with masked entries zeroed, mask [B,T] float, num_tokens, num_seqs,
# scale) -> scalar. num_tokens / num_seqs are the (local or global) denominators, already >= 1.
LOSS_AGG_MODES: Registry = Registry("loss_agg_mode")


@LOSS_AGG_MODES.register("token-mean")
def _token_mean(masked_loss, mask, num_tokens, num_seqs, scale):
    return masked_loss.sum() / num_tokens


@LOSS_AGG_MODES.register("seq-mean-token-sum")
def _seq_mean_token_sum(masked_loss, mask, num_tokens, num_seqs, scale):
    seq_sums = masked_loss.sum(dim=-1)  # [B]; 0 for empty sequences
    return seq_sums.sum() / num_seqs


@LOSS_AGG_MODES.register("seq-mean-token-mean")
def _seq_mean_token_mean(masked_loss, mask, num_tokens, num_seqs, scale):
    seq_lens = mask.sum(dim=-1).clamp(min=1.0)  # [B]; empty sequences have sum 0, divided by 1 -> 0
    return (masked_loss.sum(dim=-1) / seq_lens).sum() / num_seqs


@LOSS_AGG_MODES.register("seq-mean-token-sum-norm")
def _seq_mean_token_sum_norm(masked_loss, mask, num_tokens, num_seqs, scale):
    return masked_loss.sum(dim=-1).sum() / (num_seqs * scale)


def count_normalisers(mask: torch.Tensor) -> tuple[int, int]:
    """Local (num_tokens, num_seqs) of a mask [B,T]: Σ M and the number of rows with Σ_t M > 0.

    Sum these over micro-batches and ranks (all-reduce) and pass them to ``aggregate_loss`` as
    ``global_num_tokens`` / ``global_num_seqs``. ``num_tokens`` is a float sum when the mask carries
    weights; it is returned rounded only when the mask is integral.
    """
    _check_mask(mask, mask)
    mask_f = mask.to(torch.float64)
    num_tokens = mask_f.sum().item()
    num_seqs = int((mask_f.sum(dim=-1) > 0).sum().item())
    return (int(num_tokens) if float(num_tokens).is_integer() else num_tokens), num_seqs


def aggregate_loss(
    loss_mat: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token-mean",
    loss_scale_factor: float | None = None,
    *,
    global_num_tokens: float | None = None,
    global_num_seqs: int | None = None,
) -> torch.Tensor:
    """Aggregate ``loss_mat`` [B,T] under ``mask`` [B,T] (1 = token counts) into a scalar.

    ``mode``: one of ``LOSS_AGG_MODES`` (see the module docstring for the formulas).
    ``loss_scale_factor``: the constant T of ``seq-mean-token-sum-norm`` (default: the mask width);
    an error for the other modes, which have no such constant.
    ``global_num_tokens`` / ``global_num_seqs``: denominators over the global batch (data / micro-
    batch parallelism); default the local counts. A zero denominator means "nothing to average":
    the result is 0 with a graph to ``loss_mat``.
    """
    agg = LOSS_AGG_MODES.get(mode)
    _check_mask(loss_mat, mask)
    if loss_scale_factor is not None:
        if mode != "seq-mean-token-sum-norm":
            raise ValueError(
                f"loss_scale_factor={loss_scale_factor} only applies to loss_agg_mode="
                f"'seq-mean-token-sum-norm', not {mode!r}; leave it None"
            )
        if not loss_scale_factor > 0:
            raise ValueError(f"loss_scale_factor must be > 0, got {loss_scale_factor}")
    for name, value in (("global_num_tokens", global_num_tokens), ("global_num_seqs", global_num_seqs)):
        if value is not None and value < 0:
            raise ValueError(f"{name} must be >= 0 (a count summed over ranks), got {value}")

    mask_f = mask.to(loss_mat.dtype)
    # where, not multiply: padding may hold NaN/inf (e.g. -inf logprobs) and NaN * 0 = NaN.
    masked_loss = torch.where(mask_f != 0, loss_mat * mask_f, torch.zeros_like(loss_mat))
    # Denominators stay tensors (no host sync on GPU). A zero denominator only happens when every
    # masked sum is 0 too, so dividing by 1 instead returns 0 with a graph to loss_mat.
    # Counts in float32 at least: a bf16 sum of many ones is not exact.
    count_dtype = torch.promote_types(loss_mat.dtype, torch.float32)
    one = torch.ones((), dtype=count_dtype, device=loss_mat.device)
    mask_c = mask.to(count_dtype)
    num_tokens = mask_c.sum() if global_num_tokens is None else one * float(global_num_tokens)
    if global_num_seqs is None:
        num_seqs = (mask_c.sum(dim=-1) > 0).sum().to(count_dtype)
    else:
        num_seqs = one * float(global_num_seqs)
    num_tokens = torch.where(num_tokens > 0, num_tokens, one)
    num_seqs = torch.where(num_seqs > 0, num_seqs, one)
    scale = float(loss_scale_factor) if loss_scale_factor is not None else float(max(loss_mat.shape[-1], 1))
    return agg(masked_loss, mask_c, num_tokens, num_seqs, scale)


def _check_mask(loss_mat: torch.Tensor, mask: torch.Tensor) -> None:
    if mask.dim() != 2:
        raise ValueError(f"mask must be [B,T], got shape {tuple(mask.shape)}")
    if loss_mat.shape != mask.shape:
        raise ValueError(
            f"loss_mat {tuple(loss_mat.shape)} and mask {tuple(mask.shape)} must have the same [B,T] shape"
        )
