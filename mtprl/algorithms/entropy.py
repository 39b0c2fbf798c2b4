"""Token entropy of the policy, the entropy bonus, and token logprobs from logits.

Entropy bonus as in PPO (Schulman et al. 2017, arXiv:1707.06347, eq. 9: L = L_clip - c₂ H). Per
position, with logits z [V] and p = softmax(z):

    H = logsumexp(z) - Σ_v p_v z_v          (= -Σ p log p, without forming log p)

Same value as verl ``entropy_from_logits``. Where we differ: positions with -inf logits (top-k/top-p
masked vocab) contribute p·z = 0 instead of NaN, and ``chunk_size`` bounds the [.,V] float32
temporaries for long sequences. The bonus term is returned as a loss (``-coeff · agg(H)``) so the
trainer only adds it.
"""

from __future__ import annotations

import torch

from mtprl.algorithms.aggregate import aggregate_loss

__all__ = ["entropy_bonus", "entropy_from_logits", "logprobs_from_logits"]


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _entropy_block(logits: torch.Tensor) -> torch.Tensor:
    z = _upcast(logits)
    lse = torch.logsumexp(z, dim=-1)  # [..]
    p = torch.softmax(z, dim=-1)
    # Zero z where p == 0 *before* the product: p·(-inf) would be NaN in value and in gradient.
    z_safe = torch.where(p > 0, z, torch.zeros_like(z))
    return lse - (p * z_safe).sum(dim=-1)


def entropy_from_logits(logits: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """Entropy [B,T] (float32 or wider) of softmax(logits [B,T,V]) in nats.

    ``chunk_size``: process this many positions at a time (memory bound); None = all at once.
    """
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty vocab dimension, got shape {tuple(logits.shape)}")
    if chunk_size is None:
        return _entropy_block(logits)
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive number of positions or None, got {chunk_size}")
    flat = logits.reshape(-1, logits.shape[-1])
    parts = [_entropy_block(flat[i : i + chunk_size]) for i in range(0, flat.shape[0], chunk_size)]
    out = torch.cat(parts) if parts else flat.new_zeros(0, dtype=torch.float32)
    return out.reshape(logits.shape[:-1])


def logprobs_from_logits(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """log softmax(logits [B,T,V]) at ``token_ids`` [B,T] -> [B,T], computed in float32 or wider."""
    if logits.shape[:-1] != token_ids.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} must be token_ids {tuple(token_ids.shape)} plus a vocab dim"
        )
    z = _upcast(logits)
    picked = torch.gather(z, -1, token_ids.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(z, dim=-1)


def entropy_bonus(
    entropy: torch.Tensor,
    mask: torch.Tensor,
    entropy_coeff: float,
    loss_agg_mode: str = "token-mean",
    **agg_kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss term ``-entropy_coeff · agg(H)``, ``agg(H)`` detached for the ``actor/entropy`` metric).

    entropy [B,T] from ``entropy_from_logits``; mask [B,T]; ``agg_kwargs`` go to ``aggregate_loss``.
    """
    agg = aggregate_loss(entropy, mask, loss_agg_mode, **agg_kwargs)
    return -entropy_coeff * agg, agg.detach()
