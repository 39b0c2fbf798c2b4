"""Processed sampling distributions (temperature, top-k, top-p) against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from mtprl.rollout.sampling import processed_logprobs, sample_from_probs, sample_tokens, temperature_logprobs
from mtprl.rollout.types import SamplingParams, SpeculativeConfig

LOGITS = torch.log(torch.tensor([[0.1, 0.4, 0.2, 0.3]]))  # probabilities at temperature 1


def _probs(params: SamplingParams) -> list[float]:
    return processed_logprobs(LOGITS, params).exp()[0].tolist()


def test_temperature_one_is_softmax():
    assert _probs(SamplingParams(temperature=1.0)) == pytest.approx([0.1, 0.4, 0.2, 0.3], abs=1e-6)


def test_temperature_half_squares_probabilities():
    sq = [0.01, 0.16, 0.04, 0.09]
    z = sum(sq)
    assert _probs(SamplingParams(temperature=0.5)) == pytest.approx([x / z for x in sq], abs=1e-6)


def test_top_k_two():
    assert _probs(SamplingParams(top_k=2)) == pytest.approx([0.0, 0.4 / 0.7, 0.0, 0.3 / 0.7], abs=1e-6)


def test_top_p():
    # sorted: 0.4, 0.3, 0.2, 0.1; mass before: 0, 0.4, 0.7, 0.9
    assert _probs(SamplingParams(top_p=0.5)) == pytest.approx([0.0, 0.4 / 0.7, 0.0, 0.3 / 0.7], abs=1e-6)
    assert _probs(SamplingParams(top_p=0.75)) == pytest.approx([0.0, 0.4 / 0.9, 0.2 / 0.9, 0.3 / 0.9], abs=1e-6)
    assert _probs(SamplingParams(top_p=0.3)) == pytest.approx([0.0, 1.0, 0.0, 0.0], abs=1e-6)


def test_top_k_then_top_p():
    # top-3 -> 0.4, 0.3, 0.2 renormalised by 0.9: 0.444, 0.333, 0.222; top_p 0.7 keeps 0.444 + 0.333 = 0.778 >= 0.7
    assert _probs(SamplingParams(top_k=3, top_p=0.7)) == pytest.approx([0.0, 0.4 / 0.7, 0.0, 0.3 / 0.7], abs=1e-6)


def test_greedy_is_one_hot_and_trunk_logprobs_ignore_truncation():
    lp = processed_logprobs(LOGITS, SamplingParams(temperature=0.0))
    assert lp[0].tolist() == [float("-inf"), 0.0, float("-inf"), float("-inf")]
    tl = temperature_logprobs(LOGITS, 0.0)  # greedy -> temperature 1
    assert tl.exp()[0].tolist() == pytest.approx([0.1, 0.4, 0.2, 0.3], abs=1e-6)
    assert temperature_logprobs(LOGITS, 2.0)[0, 1].item() == pytest.approx(
        0.5 * math.log(0.4) - math.log(sum(math.sqrt(p) for p in [0.1, 0.4, 0.2, 0.3])), abs=1e-6)


def test_sampling_is_reproducible_and_unbiased():
    probs = torch.tensor([0.1, 0.4, 0.2, 0.3]).expand(100_000, 4)
    a = sample_from_probs(probs, torch.Generator().manual_seed(0))
    b = sample_from_probs(probs, torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    freq = torch.bincount(a, minlength=4).double() / a.numel()
    assert freq.tolist() == pytest.approx([0.1, 0.4, 0.2, 0.3], abs=0.01)  # 5 sigma = 0.008
    assert sample_tokens(LOGITS, None, greedy=True).item() == 1


@pytest.mark.parametrize("kwargs", [dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1),
                                    dict(max_new_tokens=0), dict(n=0)])
def test_bad_sampling_params(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_speculative_config_defaults_and_errors():
    assert SpeculativeConfig(num_steps=3).num_draft_tokens == 4
    assert SpeculativeConfig(num_steps=2, eagle_topk=2).num_draft_tokens == 5
    with pytest.raises(ValueError, match="chain"):
        SpeculativeConfig(num_steps=2, eagle_topk=1, num_draft_tokens=5)
    with pytest.raises(ValueError, match="num_draft_tokens"):
        SpeculativeConfig(num_steps=2, eagle_topk=2, num_draft_tokens=8)
    with pytest.raises(ValueError):
        SpeculativeConfig(num_steps=0)
