"""The acceptance rules in isolation, on hand-made target p and draft q over a 4-token vocabulary.

Two kinds of check:
  * exact: a slow scalar reference enumerates every branch of the rule (no sampling) and must give the
    target distribution p to 1e-12, and the probability of accepting a draft it predicts;
  * sampled: the vectorised rule, run on a big batch, must reproduce p (chi-square) and the enumerated
    acceptance rate (binomial, 5 sigma).
Sample size: with B = 200_000 draws and cells of probability >= 0.05 the chi-square test detects a 2% absolute
shift of one token's probability (0.30 -> 0.32 moves its count by 4000 = ~9.8 sigma of sqrt(B p (1-p)) = 205).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from scipy import stats

from mtprl.rollout.acceptance import chain_accept, greedy_chain_accept, greedy_tree_accept, tree_accept
from mtprl.rollout.sampling import sample_from_probs, sample_without_replacement
from mtprl.rollout.tree import DraftTree, build_tree, chain_tree

V = 4
P1 = torch.tensor([0.30, 0.05, 0.40, 0.25], dtype=torch.float64)
Q1 = torch.tensor([0.10, 0.50, 0.30, 0.10], dtype=torch.float64)
# second-token tables, row = first token
P2 = torch.tensor([[0.70, 0.10, 0.10, 0.10], [0.25, 0.25, 0.25, 0.25], [0.05, 0.05, 0.60, 0.30], [0.40, 0.40, 0.10, 0.10]],
                  dtype=torch.float64)
Q2 = torch.tensor([[0.10, 0.10, 0.70, 0.10], [0.40, 0.20, 0.20, 0.20], [0.05, 0.05, 0.60, 0.30], [0.97, 0.01, 0.01, 0.01]],
                  dtype=torch.float64)
B = 200_000


def _chisq_pvalue(observed: torch.Tensor, expected_probs: torch.Tensor) -> float:
    observed = observed.double()
    expected_probs = expected_probs.double() / expected_probs.double().sum()
    expected = expected_probs * observed.sum()
    keep = expected > 0
    assert observed[~keep].sum() == 0, "mass on a zero-probability outcome"
    return float(stats.chisquare(observed[keep].numpy(), expected[keep].numpy()).pvalue)


def _accept(p: float, q: float) -> float:
    return 1.0 if p >= q else p / q


def _exact_node(p: torch.Tensor, q: torch.Tensor, m: int, with_replacement: bool) -> tuple[torch.Tensor, float]:
    """Slow reference: exact distribution of the token emitted at one node with m children drawn from q,
    and the probability that some child is accepted, by enumerating every child sequence."""
    out = torch.zeros(V, dtype=torch.float64)
    p_accept = 0.0

    def walk(p_i, q_i, step, prob, used):
        nonlocal p_accept
        if step == m or q_i.sum() <= 0:
            out.add_(prob * p_i)
            return
        for x in range(V):
            if q_i[x] <= 0:
                continue
            a = _accept(float(p_i[x]), float(q_i[x]))
            out[x] += prob * q_i[x] * a
            p_accept += float(prob * q_i[x] * a)
            r = (p_i - q_i).clamp(min=0)
            r = r / r.sum() if r.sum() > 0 else p_i
            q_next = q_i if with_replacement else q_i.clone().index_fill_(0, torch.tensor([x]), 0.0)
            if not with_replacement and q_next.sum() > 0:
                q_next = q_next / q_next.sum()
            walk(r, q_next, step + 1, prob * q_i[x] * (1 - a), used + (x,))

    walk(p, q, 0, 1.0, ())
    return out, p_accept


@pytest.mark.parametrize("m,with_replacement", [(1, False), (2, False), (3, False), (2, True), (3, True)])
def test_exact_enumeration_gives_target(m, with_replacement):
    """The maths itself: enumerating every branch of (recursive) rejection sampling yields exactly p."""
    out, p_acc = _exact_node(P1, Q1, m, with_replacement)
    torch.testing.assert_close(out, P1, atol=1e-12, rtol=0)
    if m == 1:
        assert p_acc == pytest.approx(float(torch.minimum(P1, Q1).sum()), abs=1e-12)  # 1 - TV(p, q)


def test_chain_accept_one_draft_matches_target_and_rate():
    g = torch.Generator().manual_seed(0)
    p, q = P1.float().expand(B, V), Q1.float().expand(B, V)
    drafts = sample_from_probs(q, g)
    num_acc, tokens = chain_accept(p[:, None].expand(B, 2, V).contiguous(), q[:, None].contiguous(), drafts[:, None], g)
    first = tokens[:, 0]
    assert _chisq_pvalue(torch.bincount(first, minlength=V), P1) > 1e-3
    rate = float(torch.minimum(P1, Q1).sum())
    assert abs(num_acc.double().mean().item() - rate) < 5 * (rate * (1 - rate) / B) ** 0.5
    # accepted rows emit the draft; bonus rows come from p at position 1 (here P1 again)
    assert torch.equal(tokens[num_acc == 1, 0], drafts[num_acc == 1])


def test_chain_accept_two_drafts_joint_distribution():
    """Two drafts with context-dependent p and q: the first two emitted tokens ~ P1(x1) P2(x2|x1)."""
    g = torch.Generator().manual_seed(1)
    q1 = Q1.float().expand(B, V)
    d1 = sample_from_probs(q1, g)
    q2 = Q2.float()[d1]
    d2 = sample_from_probs(q2, g)
    target = torch.stack([P1.float().expand(B, V), P2.float()[d1], P2.float()[d2]], dim=1)  # p3 unused in the test
    num_acc, tokens = chain_accept(target, torch.stack([q1, q2], dim=1), torch.stack([d1, d2], dim=1), g)
    x1 = tokens[:, 0]
    # when only x1 was emitted this step, the next step would sample x2 from the target given x1
    x2 = torch.where(num_acc >= 1, tokens[:, 1], sample_from_probs(P2.float()[x1], g))
    joint = torch.bincount(x1 * V + x2, minlength=V * V)
    expected = (P1[:, None] * P2).reshape(-1)
    assert _chisq_pvalue(joint, expected) > 1e-3
    assert (num_acc == 2).any() and (num_acc == 0).any()


def test_greedy_chain_accept():
    target = torch.tensor([[1, 2, 3], [1, 2, 3], [0, 0, 0]])
    drafts = torch.tensor([[1, 2], [1, 0], [3, 0]])
    num_acc, tokens = greedy_chain_accept(target, drafts)
    assert num_acc.tolist() == [2, 1, 0]
    assert torch.equal(tokens, target)


def _tree_two_levels() -> DraftTree:
    tree = build_tree(num_steps=2, topk=2, num_draft_tokens=5)
    # root -> {1: rank0, 2: rank1}; node 1 -> {3: rank0, 4: rank1}
    assert tree.parents == (-1, 0, 0, 1, 1) and tree.ranks == (0, 0, 1, 0, 1)
    return tree


@pytest.mark.parametrize("with_replacement", [False, True])
def test_tree_accept_joint_distribution(with_replacement):
    tree = _tree_two_levels()
    tt = tree.tensors(torch.device("cpu"))
    g = torch.Generator().manual_seed(2 + with_replacement)
    q1 = Q1.float().expand(B, V)
    if with_replacement:
        kids = torch.stack([sample_from_probs(q1, g) for _ in range(2)], 1)
        valid = torch.ones(B, 2, dtype=torch.bool)
    else:
        kids, valid = sample_without_replacement(q1, 2, g)
    q_n1 = Q2.float()[kids[:, 0]]
    if with_replacement:
        grand = torch.stack([sample_from_probs(q_n1, g) for _ in range(2)], 1)
        gvalid = torch.ones(B, 2, dtype=torch.bool)
    else:
        grand, gvalid = sample_without_replacement(q_n1, 2, g)
    node_tokens = torch.cat([torch.zeros(B, 1, dtype=torch.long), kids, grand], 1)  # [B,5]
    node_valid = torch.cat([torch.ones(B, 1, dtype=torch.bool), valid, gvalid], 1)
    target = torch.stack([P1.float().expand(B, V)] + [P2.float()[node_tokens[:, i]] for i in range(1, 5)], 1)
    draft = torch.stack([q1, q_n1] + [q1] * 3, 1)  # leaves' q unused
    num_acc, path, tokens = tree_accept(tt, target, draft, node_tokens, node_valid, g, with_replacement=with_replacement)
    x1 = tokens[:, 0]
    x2 = torch.where(num_acc >= 1, tokens[:, 1], sample_from_probs(P2.float()[x1], g))
    joint = torch.bincount(x1 * V + x2, minlength=V * V)
    assert _chisq_pvalue(joint, (P1[:, None] * P2).reshape(-1)) > 1e-3
    # the root's acceptance probability equals the exact enumeration with 2 children
    _, p_acc = _exact_node(P1, Q1, 2, with_replacement)
    rate = (num_acc >= 1).double().mean().item()
    assert abs(rate - p_acc) < 5 * (p_acc * (1 - p_acc) / B) ** 0.5
    # path consistency: accepted node ids have the right depth and emitted tokens are theirs
    ok = num_acc >= 1
    assert torch.isin(path[ok, 0], torch.tensor([1, 2])).all()
    assert torch.equal(tokens[ok, 0], node_tokens[ok].gather(1, path[ok, :1]).squeeze(1))
    deep = num_acc == 2
    assert deep.any() and torch.isin(path[deep, 1], torch.tensor([3, 4])).all()


def test_greedy_tree_accept():
    tree = _tree_two_levels()
    tt = tree.tensors(torch.device("cpu"))
    node_tokens = torch.tensor([[0, 5, 6, 7, 8], [0, 5, 6, 7, 8], [0, 5, 6, 7, 8]])
    # row 0: root wants 6 (rank-1 child, a leaf) -> then bonus from node 2; row 1: 5 then 8 then bonus of node 4
    # row 2: root wants 9: nothing accepted
    target = torch.tensor([[6, 0, 3, 0, 0], [5, 8, 0, 0, 2], [9, 0, 0, 0, 0]])
    num_acc, path, tokens = greedy_tree_accept(tt, target, node_tokens)
    assert num_acc.tolist() == [1, 2, 0]
    assert tokens[0, :2].tolist() == [6, 3] and tokens[1].tolist() == [5, 8, 2] and tokens[2, 0].item() == 9
    assert path[1].tolist() == [1, 4]


def test_build_tree_shapes():
    assert chain_tree(3).is_chain and chain_tree(3).parents == (-1, 0, 1, 2)
    t = build_tree(3, 2, 8)
    assert t.num_nodes == 8 and t.max_depth <= 3
    for n in range(1, t.num_nodes):  # parents first, elder siblings present
        assert t.parents[n] < n and t.depths[n] == t.depths[t.parents[n]] + 1
        if t.ranks[n] > 0:
            assert any(t.parents[s] == t.parents[n] and t.ranks[s] == t.ranks[n] - 1 for s in range(t.num_nodes))
    anc = t.ancestors
    assert anc[:, 0].all() and torch.equal(anc.diagonal(), torch.ones(8, dtype=torch.bool))
    assert t.truncate(1).max_depth == 1
    with pytest.raises(ValueError):
        build_tree(2, 2, 8)  # at most 1 + 2 + 4 = 7 nodes


def test_sample_without_replacement_order_is_plackett_luce():
    """First two draws without replacement: P(x1=a, x2=b) = q(a) q(b) / (1 - q(a))."""
    g = torch.Generator().manual_seed(5)
    toks, valid = sample_without_replacement(Q1.float().expand(B, V), 2, g)
    assert valid.all()
    joint = torch.bincount(toks[:, 0] * V + toks[:, 1], minlength=V * V)
    expected = torch.tensor([[0.0 if a == b else float(Q1[a] * Q1[b] / (1 - Q1[a])) for b in range(V)] for a in range(V)],
                            dtype=torch.float64)
    assert _chisq_pvalue(joint, expected.reshape(-1)) > 1e-3
    small = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    _, v = sample_without_replacement(small, 2, g)
    assert v.tolist() == [[True, False]]


def test_exact_enumeration_covers_all_pairs():
    """Sanity of the reference itself: it sums to one for every (m, replacement) combination."""
    for m, rep in itertools.product([1, 2, 3], [False, True]):
        out, _ = _exact_node(P1, Q1, m, rep)
        assert abs(float(out.sum()) - 1.0) < 1e-12
