"""Does a rollout back-end sample from the model's distribution? Goodness-of-fit tests of sampled completions
against the model's own conditionals (teacher-forced forwards of our reference model), for ``mtprl check-rollout``
and the back-end tests.

Two tests, both exact under the null (the back-end samples the processed distribution q_t(. | prefix) at every
position t, as SamplingParams defines it):
  * ``joint_chi_square`` (small vocabularies): counts of the first ``depth`` tokens against their exact joint
    probability (from forwards over every prefix), cells with expected count < 5 pooled;
  * ``pit_chi_square`` (any vocabulary): the randomised probability integral transform
    u_t = F_t(x_t - 1) + U * q_t(x_t), F_t the CDF of q_t in token-id order and U ~ Uniform(0, 1), is i.i.d.
    Uniform(0, 1) exactly when every x_t is drawn from q_t; u is binned (equal-width bins) and tested per
    position. Speculative decoding acts from the second token on (the first comes from the prefill), so a
    drafter / verifier fault shows at positions >= 2.
Numerical differences between the back-end's kernels and our forward (fp32: ~1e-6 in probability) are far
below what these sample sizes can see; in bf16 they are not, so check in fp32.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from scipy import stats

from mtprl.rollout.sampling import processed_logprobs
from mtprl.rollout.types import Completion, SamplingParams


@dataclass
class TestResult:
    name: str
    statistic: float
    df: int
    p_value: float
    n: int


def chi_square(counts: torch.Tensor, probs: torch.Tensor, name: str, min_expected: float = 5.0) -> TestResult:
    """Pearson chi-square of ``counts`` against ``probs`` (same shape, probs summing to 1); cells whose expected
    count is below ``min_expected`` are pooled into one cell (dropped if that cell is still below it)."""
    counts, probs = counts.double().flatten(), probs.double().flatten()
    n = float(counts.sum())
    expected = probs / probs.sum() * n
    big = expected >= min_expected
    obs = list(counts[big].tolist())
    exp = list(expected[big].tolist())
    rest_e, rest_o = float(expected[~big].sum()), float(counts[~big].sum())
    if rest_e >= min_expected:
        obs.append(rest_o)
        exp.append(rest_e)
    elif rest_o > 0 and rest_e > 0:  # a few samples in cells of tiny probability: keep them in the test
        obs[-1] += rest_o
        exp[-1] += rest_e
    obs_t, exp_t = torch.tensor(obs), torch.tensor(exp)
    exp_t = exp_t * obs_t.sum() / exp_t.sum()
    statistic = float(((obs_t - exp_t) ** 2 / exp_t).sum())
    df = max(len(obs) - 1, 1)
    return TestResult(name, statistic, df, float(stats.chi2.sf(statistic, df)), int(n))


@torch.no_grad()
def exact_joint(model, prompt: list[int], params: SamplingParams, depth: int) -> torch.Tensor:
    """[V]*depth exact probability of the first ``depth`` tokens under the processed sampling distribution (V**d
    prefixes: small vocabularies only)."""
    vocab = model.config.vocab_size
    joint = torch.ones(())
    for d in range(depth):
        prefixes = [prompt + list(p) for p in itertools.product(range(vocab), repeat=d)]
        logits = model(torch.tensor(prefixes)).logits[:, -1]
        q = processed_logprobs(logits, params).exp().double().view(*([vocab] * d), vocab)
        joint = joint.unsqueeze(-1) * q
    return joint


def joint_chi_square(model, prompt: list[int], completions: list[Completion], params: SamplingParams,
                     depth: int = 2) -> TestResult:
    vocab = model.config.vocab_size
    counts = torch.zeros([vocab] * depth)
    for c in completions:
        if len(c.token_ids) < depth:
            raise ValueError("every completion needs at least `depth` tokens (no stop tokens, enough new tokens)")
        counts[tuple(c.token_ids[:depth])] += 1
    return chi_square(counts, exact_joint(model, prompt, params, depth), f"joint of tokens 1..{depth}")


@torch.no_grad()
def pit_values(model, prompt: list[int], completions: list[Completion], params: SamplingParams,
               generator: torch.Generator, batch_size: int = 64) -> list[torch.Tensor]:
    """Per position t (0-based), the randomised PIT value of every completion that reached t."""
    per_pos: list[list[float]] = []
    for start in range(0, len(completions), batch_size):
        chunk = completions[start:start + batch_size]
        longest = max(len(c.token_ids) for c in chunk)
        ids = torch.tensor([prompt + c.token_ids + [0] * (longest - len(c.token_ids)) for c in chunk])
        logits = model(ids).logits[:, len(prompt) - 1: len(prompt) - 1 + longest].float()  # [B,T,V]
        q = processed_logprobs(logits, params).exp()
        cdf = q.cumsum(-1)
        for b, c in enumerate(chunk):
            tok = torch.tensor(c.token_ids)
            t = torch.arange(len(tok))
            p_x = q[b, t, tok]
            below = cdf[b, t, tok] - p_x
            u = below + torch.rand(len(tok), generator=generator) * p_x
            for j, v in enumerate(u.tolist()):
                if j == len(per_pos):
                    per_pos.append([])
                per_pos[j].append(v)
    return [torch.tensor(v) for v in per_pos]


def pit_chi_square(model, prompt: list[int], completions: list[Completion], params: SamplingParams,
                   positions: int = 4, bins: int = 20, seed: int = 0) -> list[TestResult]:
    """One uniformity test per position 1..positions (1-based in the names) of the PIT values (equal-width bins)."""
    values = pit_values(model, prompt, completions, params, torch.Generator().manual_seed(seed))
    out = []
    for j, v in enumerate(values[:positions]):
        counts = torch.histc(v.clamp(0, 1 - 1e-9), bins=bins, min=0.0, max=1.0)
        out.append(chi_square(counts, torch.full((bins,), 1.0 / bins), f"PIT uniformity at token {j + 1}"))
    return out
