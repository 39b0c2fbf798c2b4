"""GRPO / RLOO / REINFORCE++ advantages against hand-computed numbers and a slow reference."""

import numpy as np
import pytest
import torch

from mtprl.algorithms import (
    ADV_ESTIMATORS,
    broadcast_to_tokens,
    compute_grpo_advantages,
    compute_reinforce_plus_plus_advantages,
    compute_rloo_advantages,
    get_adv_estimator,
    scores_to_token_rewards,
)


def close(a, b, atol=1e-6):
    torch.testing.assert_close(a, torch.as_tensor(b, dtype=a.dtype), atol=atol, rtol=0)


# ------------------------------------------------------------------------------------------ GRPO


def test_grpo_hand_computed_groups():
    # group "a" = [1, 0, 1, 0]: mean 0.5, unbiased var = 4·0.25/3 = 1/3, std = 0.5773503
    #   A = ±0.5 / (0.5773503 + 1e-6) = ±0.8660239
    # group "b" = [1, 2, 4]: mean 7/3, squared deviations 16/9, 1/9, 25/9 -> sum 42/9, /2 = 7/3,
    #   std = 1.5275252;  A = (-4/3, -1/3, 5/3) / 1.5275262 = -0.8728709, -0.2182177, 1.0910886
    # group "c" = [5]: a group of one -> mean 0, std 1: A = 5 / (1 + 1e-6) = 4.999995
    # group "d" = [2, 2]: all equal -> 0 / (0 + 1e-6) = 0
    scores = torch.tensor([1.0, 1.0, 0.0, 2.0, 1.0, 5.0, 4.0, 0.0, 2.0, 2.0])
    ids = ["a", "b", "a", "b", "a", "c", "b", "a", "d", "d"]
    adv = compute_grpo_advantages(scores, ids)
    close(
        adv,
        [0.8660239, -0.8728709, -0.8660239, -0.2182177, 0.8660239, 4.999995, 1.0910886, -0.8660239, 0.0, 0.0],
    )


def test_grpo_without_std_normalisation():
    # A = s - mean: group [1, 0, 1, 0] -> ±0.5; a group of one keeps its score (mean 0): 5
    adv = compute_grpo_advantages(torch.tensor([1.0, 0.0, 1.0, 0.0, 5.0]), [0, 0, 0, 0, 1], norm_by_std=False)
    close(adv, [0.5, -0.5, 0.5, -0.5, 5.0])


def test_grpo_epsilon_matters_for_tiny_std():
    # group [0, 1e-6]: mean 5e-7, std = 1e-6/sqrt(2) = 7.0710678e-7;
    # A = ±5e-7 / (7.0710678e-7 + 1e-6) = ±0.2928932
    adv = compute_grpo_advantages(torch.tensor([0.0, 1e-6], dtype=torch.float64), [0, 0])
    close(adv, [-0.2928932, 0.2928932])


def test_grpo_group_ids_as_long_tensor_match_strings():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 2, (12,), generator=g).float()
    ids = torch.tensor([3, 3, 7, 7, 3, 7, 9, 9, 9, 3, 7, 9])
    a = compute_grpo_advantages(scores, ids)
    b = compute_grpo_advantages(scores, [f"uid-{i}" for i in ids.tolist()])
    torch.testing.assert_close(a, b)
    c = compute_grpo_advantages(scores, np.array([f"uid-{i}" for i in ids.tolist()], dtype=object))  # verl's uid array
    torch.testing.assert_close(a, c)


def test_grpo_matches_slow_reference():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(40, generator=g)
    ids = torch.randint(0, 9, (40,), generator=g).tolist()
    expected = torch.empty(40)
    for i in range(40):
        members = torch.stack([scores[j] for j in range(40) if ids[j] == ids[i]])
        mean, std = (members.mean(), members.std()) if len(members) > 1 else (torch.tensor(0.0), torch.tensor(1.0))
        expected[i] = (scores[i] - mean) / (std + 1e-6)
    torch.testing.assert_close(compute_grpo_advantages(scores, ids), expected, atol=1e-5, rtol=1e-5)


def test_grpo_dtype_device_and_integer_scores():
    adv = compute_grpo_advantages(torch.tensor([1, 0]), [0, 0])  # integer scores -> float32 out
    assert adv.dtype == torch.float32
    # [1, 0]: mean 0.5, std = sqrt(0.5) = 0.7071068 -> ±0.5/0.7071078 = ±0.7071058
    close(adv, [0.7071058, -0.7071058])
    assert compute_grpo_advantages(torch.tensor([1.0, 0.0], dtype=torch.float64), [0, 0]).dtype == torch.float64
    assert compute_grpo_advantages(torch.zeros(0), []).shape == (0,)


@pytest.mark.parametrize(
    "scores, ids, match",
    [
        (torch.zeros(3), [0, 0], "3 scores"),
        (torch.zeros(2, 2), [0, 0], "1-D"),
        (torch.tensor([1.0, float("nan")]), [0, 0], "NaN"),
        (torch.zeros(2), [[0], [0]], "hashable"),
    ],
)
def test_grpo_bad_input(scores, ids, match):
    with pytest.raises(ValueError, match=match):
        compute_grpo_advantages(scores, ids)


# ------------------------------------------------------------------------------------------ RLOO


def test_rloo_hand_computed():
    # [1, 0, 1, 0]: A_0 = 1 - (0+1+0)/3 = 0.6666667, A_1 = 0 - (1+1+0)/3 = -0.6666667
    # [1, 2, 4]:   1 - (2+4)/2 = -2,  2 - (1+4)/2 = -0.5,  4 - (1+2)/2 = 2.5
    # [5]:         a group of one has no baseline -> 0
    scores = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 2.0, 4.0, 5.0])
    ids = [0, 0, 0, 0, 1, 1, 1, 2]
    close(compute_rloo_advantages(scores, ids), [2 / 3, -2 / 3, 2 / 3, -2 / 3, -2.0, -0.5, 2.5, 0.0])


def test_rloo_all_equal_is_zero():
    close(compute_rloo_advantages(torch.tensor([3.0, 3.0, 3.0]), ["x", "x", "x"]), [0.0, 0.0, 0.0])


# ------------------------------------------------------------------------------------ REINFORCE++


def test_reinforce_plus_plus_hand_computed():
    # rewards row0 [0, 0, 1] mask [1, 1, 1]; row1 [0, 2, 0] mask [1, 1, 0]; γ = 1
    # returns row0: t2 = 1, t1 = 0 + 1 = 1, t0 = 1        -> [1, 1, 1]
    # returns row1: t2 = 0 (then reset, mask 0), t1 = 2, t0 = 2 -> [2, 2, 0]
    # valid returns [1, 1, 1, 2, 2]: mean 1.4, Σ(dev²) = 3·0.16 + 2·0.36 = 1.2, unbiased var 0.3,
    # std 0.5477226: A = -0.4/0.5477226 = -0.7302967, 0.6/0.5477226 = 1.0954451; masked -> 0
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = compute_reinforce_plus_plus_advantages(rewards, mask, gamma=1.0)
    close(ret, [[1.0, 1.0, 1.0], [2.0, 2.0, 0.0]])
    close(adv, [[-0.7302967, -0.7302967, -0.7302967], [1.0954451, 1.0954451, 0.0]])


def test_reinforce_plus_plus_discount_and_kl_rewards():
    # γ = 0.5, rewards row0 [-0.1, -0.1, 1.0] (KL penalties then the score), mask all ones
    # returns: t2 = 1.0, t1 = -0.1 + 0.5·1.0 = 0.4, t0 = -0.1 + 0.5·0.4 = 0.1
    rewards = torch.tensor([[-0.1, -0.1, 1.0]])
    _, ret = compute_reinforce_plus_plus_advantages(rewards, torch.ones(1, 3), gamma=0.5)
    close(ret, [[0.1, 0.4, 1.0]])


def test_reinforce_plus_plus_padding_does_not_leak():
    # A reward sitting on a padded position (mask 0) must not flow into the valid tokens before it.
    rewards = torch.tensor([[1.0, 0.0, 7.0], [0.0, 0.0, 1.0]])
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    _, ret = compute_reinforce_plus_plus_advantages(rewards, mask, gamma=1.0)
    assert ret[0, 0].item() == pytest.approx(1.0)


def test_reinforce_plus_plus_degenerate_batches_give_zeros():
    adv, _ = compute_reinforce_plus_plus_advantages(torch.tensor([[1.0, 2.0]]), torch.tensor([[0, 1]]))
    close(adv, [[0.0, 0.0]])  # one valid token: variance undefined -> zeros, no NaN
    adv, _ = compute_reinforce_plus_plus_advantages(torch.ones(2, 2), torch.zeros(2, 2))
    close(adv, [[0.0, 0.0], [0.0, 0.0]])
    with pytest.raises(ValueError, match="gamma"):
        compute_reinforce_plus_plus_advantages(torch.ones(1, 2), torch.ones(1, 2), gamma=1.5)


# ------------------------------------------------------------------------------- token helpers


def test_broadcast_and_scores_to_token_rewards():
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
    close(broadcast_to_tokens(torch.tensor([2.0, -1.0, 3.0]), mask), [[2, 2, 0, 0], [-1, 0, -1, 0], [0, 0, 0, 0]])
    # score on the last token whose mask is 1; an empty row keeps its score in column 0
    close(
        scores_to_token_rewards(torch.tensor([2.0, -1.0, 3.0]), mask),
        [[0, 2, 0, 0], [0, 0, -1, 0], [3, 0, 0, 0]],
    )
    with pytest.raises(ValueError, match="seq_values"):
        broadcast_to_tokens(torch.zeros(2), mask)


# ---------------------------------------------------------------------------------- registry


def test_registry_estimators_agree_with_direct_functions():
    assert {"grpo", "rloo", "reinforce_plus_plus"} <= set(ADV_ESTIMATORS.names())
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]])
    scores = torch.tensor([1.0, 0.0, 1.0, 1.0])
    rewards = scores_to_token_rewards(scores, mask)
    ids = ["p", "p", "q", "q"]
    adv, ret = get_adv_estimator("grpo")(rewards, mask, ids, epsilon=1e-6, norm_by_std=True)
    torch.testing.assert_close(adv, broadcast_to_tokens(compute_grpo_advantages(scores, ids), mask))
    torch.testing.assert_close(ret, adv)
    adv, _ = get_adv_estimator("rloo")(rewards, mask, ids)
    torch.testing.assert_close(adv, broadcast_to_tokens(compute_rloo_advantages(scores, ids), mask))
    adv, ret = get_adv_estimator("reinforce_plus_plus")(rewards, mask, ids, gamma=1.0)
    torch.testing.assert_close(adv, compute_reinforce_plus_plus_advantages(rewards, mask)[0])


def test_unknown_estimator_names_closest():
    with pytest.raises(ValueError, match="did you mean 'rloo'"):
        get_adv_estimator("rlo")
    with pytest.raises(ValueError, match="did you mean 'reinforce_plus_plus'"):
        get_adv_estimator("reinforce++")
