"""Token sampling: logits -> processed distribution -> token, with an explicit torch.Generator.

Processing order (as HF `generate` and vLLM): temperature, then top-k, then top-p (nucleus, Holtzman et al.
2020): q = renormalise(softmax(logits / T) restricted to S), S = the top-k tokens (ties with the k-th kept),
then the smallest prefix of those sorted by probability (stable sort: ties broken by token id) whose mass
reaches top_p. Temperature 0 means greedy: q is the one-hot of argmax(logits).

One token is drawn by inverse CDF (one uniform per row, no normalisation needed: speculative decoding's
residuals max(p - q, 0) are sampled unnormalised). Several distinct tokens (tree children) use the exponential
race (the Gumbel-max trick in ratio form): with E_v ~ Exp(1) i.i.d., the order of the m largest q_v / E_v is a
sample of m tokens WITHOUT replacement (successive draws with renormalisation, Plackett-Luce).

Where we differ: nothing numerical; the draft and target distributions of speculative decoding go through
this very function, so the top-k / top-p cut is applied identically to both (what exactness requires).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mtprl.rollout.types import SamplingParams


def processed_logprobs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[..., V] logits -> [..., V] float32 log q (the processed sampling distribution; -inf outside its support).

    Greedy params give the log one-hot of the argmax (0 at the argmax, -inf elsewhere).
    """
    logits = logits.float()
    if params.greedy:
        out = torch.full_like(logits, float("-inf"))
        return out.scatter_(-1, logits.argmax(-1, keepdim=True), 0.0)
    scaled = logits / params.temperature if params.temperature != 1.0 else logits
    vocab = scaled.shape[-1]
    if 0 < params.top_k < vocab:
        kth = scaled.topk(params.top_k, dim=-1).values[..., -1:]  # [...,1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if params.top_p < 1.0:
        scaled = _top_p_mask(scaled, params.top_p)
    return F.log_softmax(scaled, dim=-1)


def _top_p_mask(scaled: torch.Tensor, top_p: float) -> torch.Tensor:
    """Set to -inf every token outside the nucleus: sorted by probability (descending, stable), a token is
    dropped when the mass of the tokens before it already reaches top_p (the most likely token always stays)."""
    probs = F.softmax(scaled, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs
    drop_sorted = mass_before >= top_p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return scaled.masked_fill(drop, float("-inf"))


def temperature_logprobs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """[..., V] -> float32 log_softmax(logits / T) with T = temperature, or 1 when temperature is 0 (greedy).
    No top-k / top-p: the value the trainer's forward computes for the same token."""
    t = temperature if temperature > 0 else 1.0
    logits = logits.float()
    return F.log_softmax(logits / t if t != 1.0 else logits, dim=-1)


def exponential_noise(shape: torch.Size | tuple[int, ...], generator: torch.Generator | None,
                      device: torch.device) -> torch.Tensor:
    """Exp(1) noise of `shape` drawn on the generator's device (reproducible), moved to `device`."""
    gen_device = generator.device if generator is not None else device
    noise = torch.empty(shape, dtype=torch.float32, device=gen_device).exponential_(generator=generator)
    noise.clamp_(min=torch.finfo(torch.float32).tiny)  # exponential_ may return 0.0: keep q / E finite
    return noise.to(device, non_blocking=True)


def uniform_noise(shape: torch.Size | tuple[int, ...], generator: torch.Generator | None,
                  device: torch.device) -> torch.Tensor:
    """U[0,1) noise of `shape` drawn on the generator's device, moved to `device`."""
    gen_device = generator.device if generator is not None else device
    noise = torch.rand(shape, dtype=torch.float32, device=gen_device, generator=generator)
    return noise if noise.device == device else noise.to(device, non_blocking=True)


def sample_from_probs(probs: torch.Tensor, generator: torch.Generator | None,
                      uniforms: torch.Tensor | None = None) -> torch.Tensor:
    """[..., V] non-negative weights (need not sum to 1, at least one > 0) -> [...] long token ids ~ probs.

    Inverse CDF: token = first v with cdf_v > u, u ~ U[0, total) (one uniform per row; ~6x cheaper on CPU than
    the exponential race, which needs a logarithm per vocabulary entry). Zero-weight tokens have an empty
    interval and are never drawn; u is kept strictly below the total so the index stays in range.
    `uniforms` [..., 1]: U[0,1) draws to use instead of drawing from `generator` (drawn ahead, e.g. for every
    level of a draft chain at once); consumed (scaled in place)."""
    cdf = probs.float().cumsum(-1)
    total = cdf[..., -1:]
    u = (uniform_noise(total.shape, generator, probs.device) if uniforms is None else uniforms).mul_(total)
    u = torch.minimum(u, torch.nextafter(total, total.new_zeros(())))
    return torch.searchsorted(cdf, u, right=True).squeeze(-1)


def sample_tokens(logprobs: torch.Tensor, generator: torch.Generator | None, greedy: bool) -> torch.Tensor:
    """[..., V] processed log q -> [...] token ids (argmax when greedy, else a sample of q)."""
    if greedy:
        return logprobs.argmax(-1)
    return sample_from_probs(logprobs.exp(), generator)


def sample_without_replacement(probs: torch.Tensor, num: int, generator: torch.Generator | None
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., V] weights -> (tokens [..., num], valid [..., num]): `num` distinct tokens in the order of successive
    sampling without replacement from probs. valid is False where the support of probs had fewer than `num`
    tokens (those slots hold arbitrary zero-probability tokens)."""
    noise = exponential_noise(probs.shape, generator, probs.device)
    keys, tokens = (probs / noise).topk(num, dim=-1)
    return tokens, keys > 0
