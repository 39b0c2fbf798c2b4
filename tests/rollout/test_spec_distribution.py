"""Speculative sampling keeps the model's sampling distribution EXACTLY (chi-square goodness of fit).

Setup: a vocabulary of 8, one prompt, n = 60_000 samples of 3 new tokens in one generate call (rows refilled
by continuous batching). The exact distribution of the continuations under the processed sampling rule
(temperature / top-p) is computed from full forwards over all 8 x 8 prefixes, and the observed joint counts of
  (x1, x2): the prefill token and the first speculative token,
  (x2, x3): the first two tokens produced by speculative steps (marginalised over x1)
are tested against it (64 cells each, p-value threshold 1e-3; the seed is fixed so the outcome is too).

Sample size (computed in `_required_samples`, asserted below): we want to detect a 2% absolute shift of one
token's probability (p(a) -> p(a) + 0.02, the other tokens scaled down, conditionals unchanged). The chi-square
statistic is then non-central with lambda = N * sum_c (p'_c - p_c)^2 / p_c; for every token a of the tested
marginal we find the smallest N with power >= 0.95 at level 1e-3 and df = 63, and take the largest over a.
For the distributions here that is about 25-45k samples; we draw 60k. A negative control (the residual
replaced by the target, a classic bug) must fail the same test.
"""

from __future__ import annotations

import pytest
import torch
from scipy import stats

import mtprl.rollout.speculative as speculative
from mtprl.rollout import Engine, SamplingParams, SpeculativeConfig
from mtprl.rollout.sampling import processed_logprobs, sample_from_probs

V = 8
N = 60_000
PROMPT = [1, 2, 3]
ALPHA = 1e-3


def _exact_joint(model, params: SamplingParams) -> torch.Tensor:
    """[V,V,V] exact probability of (x1, x2, x3) under the processed sampling distribution."""
    with torch.no_grad():
        p1 = processed_logprobs(model(torch.tensor([PROMPT])).logits[0, -1], params).exp().double()  # [V]
        pre2 = torch.tensor([PROMPT + [a] for a in range(V)])
        p2 = processed_logprobs(model(pre2).logits[:, -1], params).exp().double()  # [V(x1), V]
        pre3 = torch.tensor([PROMPT + [a, b] for a in range(V) for b in range(V)])
        p3 = processed_logprobs(model(pre3).logits[:, -1], params).exp().double().view(V, V, V)
    return p1[:, None, None] * p2[:, :, None] * p3


def _required_samples(pair: torch.Tensor, shift: float = 0.02, power: float = 0.95) -> int:
    """Smallest N detecting a `shift` of any single first-coordinate token (see module docstring)."""
    df = pair.numel() - 1
    crit = stats.chi2.ppf(1 - ALPHA, df)
    marg = pair.sum(1)
    worst = 0
    for a in range(V):
        if not 0.05 < marg[a] < 0.95:
            continue  # a 2% shift of a near-impossible token is not the case we size for
        scale = torch.full((V,), (1 - marg[a] - shift) / (1 - marg[a]), dtype=torch.float64)
        scale[a] = (marg[a] + shift) / marg[a]
        alt = pair * scale[:, None]
        keep = pair > 0
        lam1 = float((((alt - pair)[keep]) ** 2 / pair[keep]).sum())  # noncentrality per sample
        n = 100
        while stats.ncx2.sf(crit, df, n * lam1) < power:
            n = int(n * 1.1) + 1
        worst = max(worst, n)
    return worst


def _pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    probs = probs.reshape(-1) / probs.sum()
    counts = counts.reshape(-1).double()
    keep = probs > 1e-12
    assert counts[~keep].sum() == 0, "sampled a continuation of probability 0"
    return float(stats.chisquare(counts[keep].numpy(), (probs[keep] * counts.sum()).numpy()).pvalue)


def _observed(model, params, spec, seed):
    eng = Engine(model, max_num_seqs=15_000, max_seq_len=16)
    out = eng.generate_with_metrics([PROMPT], params, speculative=spec, generator=torch.Generator().manual_seed(seed))
    toks = torch.tensor([c.token_ids for c in out.completions])  # [N,3]
    assert toks.shape == (N, 3)
    return toks, out.metrics


CASES = [
    ("chain_t1", SamplingParams(temperature=1.0, max_new_tokens=3, n=N), SpeculativeConfig(num_steps=2), 1),
    ("chain_t07_p09", SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=3, n=N), SpeculativeConfig(num_steps=2), 2),
    ("tree_t1", SamplingParams(temperature=1.0, max_new_tokens=3, n=N),
     SpeculativeConfig(num_steps=2, eagle_topk=2, num_draft_tokens=5), 1),
    ("tree_t07_p09", SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=3, n=N),
     SpeculativeConfig(num_steps=2, eagle_topk=3, num_draft_tokens=6), 2),
    # adaptive: step 1 drafts max depth, step 2 is a plain step (exploration), mixed with refills
    ("adaptive_t1", SamplingParams(temperature=1.0, max_new_tokens=3, n=N), SpeculativeConfig(num_steps=2, adaptive=True), 1),
    ("chain_t1_draft_t05", SamplingParams(temperature=1.0, max_new_tokens=3, n=N),
     SpeculativeConfig(num_steps=2, draft_temperature=0.5), 2),
    ("tree_t07_p09_draft_t03", SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=3, n=N),
     SpeculativeConfig(num_steps=2, eagle_topk=2, num_draft_tokens=5, draft_temperature=0.3), 1),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,params,spec,num_mtp", CASES, ids=[c[0] for c in CASES])
def test_speculative_distribution_is_exact(draftable_model, name, params, spec, num_mtp):
    model = draftable_model(vocab=V, num_mtp_layers=num_mtp, noise=0.6, logit_scale=8.0, seed=11)
    joint = _exact_joint(model, params)
    p12, p23 = joint.sum(2), joint.sum(0)
    assert N >= _required_samples(p12) and N >= _required_samples(p23)
    toks, metrics = _observed(model, params, spec, seed=5)
    rates = metrics.accept_rate_per_depth
    assert 0.2 < rates[0] < 0.95, f"acceptance {rates} should be ragged for a meaningful test"
    c12 = torch.bincount(toks[:, 0] * V + toks[:, 1], minlength=V * V)
    c23 = torch.bincount(toks[:, 1] * V + toks[:, 2], minlength=V * V)
    assert _pvalue(c12, p12) > ALPHA and _pvalue(c23, p23) > ALPHA


@pytest.mark.slow
def test_plain_sampling_distribution_is_exact(draftable_model):
    """The reference for the above: the engine's plain sampling against the same exact distribution."""
    model = draftable_model(vocab=V, num_mtp_layers=1, noise=0.6, logit_scale=8.0, seed=11)
    params = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=3, n=N)
    joint = _exact_joint(model, params)
    toks, _ = _observed(model, params, None, seed=6)
    assert _pvalue(torch.bincount(toks[:, 1] * V + toks[:, 2], minlength=V * V), joint.sum(0)) > ALPHA


@pytest.mark.slow
def test_negative_control_wrong_residual_is_detected(draftable_model, monkeypatch):
    """Sampling the rejection fallback from p instead of max(p - q, 0) biases the output; the test must see it."""

    def wrong_chain_accept(target_probs, draft_probs, draft_tokens, generator):
        b, k1, v = target_probs.shape
        p_d = target_probs[:, :-1].gather(-1, draft_tokens[..., None]).squeeze(-1)
        q_d = draft_probs.gather(-1, draft_tokens[..., None]).squeeze(-1)
        u = torch.rand(p_d.shape, generator=generator)
        num_acc = (u * q_d < p_d).long().cumprod(-1).sum(-1)
        final = sample_from_probs(target_probs.gather(1, num_acc[:, None, None].expand(b, 1, v)).squeeze(1), generator)
        tokens = torch.cat([draft_tokens, final[:, None]], 1).scatter(1, num_acc[:, None], final[:, None])
        return num_acc, tokens

    monkeypatch.setattr(speculative, "chain_accept", wrong_chain_accept)
    model = draftable_model(vocab=V, num_mtp_layers=1, noise=0.6, logit_scale=8.0, seed=11)
    params = SamplingParams(temperature=1.0, max_new_tokens=3, n=N)
    joint = _exact_joint(model, params)
    toks, _ = _observed(model, params, SpeculativeConfig(num_steps=2), seed=5)
    assert _pvalue(torch.bincount(toks[:, 1] * V + toks[:, 2], minlength=V * V), joint.sum(0)) < ALPHA
