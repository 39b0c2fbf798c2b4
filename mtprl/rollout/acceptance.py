"""Exact acceptance rules of speculative decoding, vectorised over the batch (pure tensor functions).

Chain (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding", Alg. 1; Chen et al.
2023, "Accelerating LLM Decoding with Speculative Sampling"): drafts d_j ~ q_j, target p_j. Accept d_j with
probability min(1, p_j(d_j) / q_j(d_j)); at the first rejection emit a token from the residual
    r_j = max(p_j - q_j, 0) / sum(max(p_j - q_j, 0));
if all K drafts are accepted emit a bonus token from p_{K+1}. The emitted sequence is distributed exactly as
K+1 (or fewer) tokens sampled from p one at a time. Per step: P(accept d) = sum_v min(p_v, q_v) = 1 - TV(p, q).

Tree (recursive rejection sampling, "RRS": SpecInfer, Miao et al. 2024, Alg. "multi-step speculative
sampling"; without replacement: Jeon et al. 2024, "Recursive Speculative Decoding", Thm. 3.1). At a node with
target p and children x_1..x_m drawn SUCCESSIVELY WITHOUT REPLACEMENT from the draft q (so, given x_<i,
x_i ~ q_i := q restricted to V minus {x_<i}, renormalised), set p_1 = p, q_1 = q and for i = 1..m:
    accept x_i with probability min(1, p_i(x_i) / q_i(x_i))  -> descend into x_i and repeat there;
    else p_{i+1} = max(p_i - q_i, 0) / Z_i,  q_{i+1} = q_i without x_i, renormalised.
If every child is rejected (or the node is a leaf) emit a token from p_{m+1} (p at a leaf: the bonus token).
Proof of exactness, by backward induction on i: let Y be the emitted token. Claim: given the history up to
step i (x_<i rejected), Y ~ p_i. At i = m+1 Y is drawn from p_{m+1} directly. At step i, x_i ~ q_i given the
history (the uniforms of earlier steps are independent of x_i), so step i is one Leviathan step with draft
q_i and target p_i whose rejection branch yields (induction) a sample of p_{i+1} = normalise(max(p_i-q_i, 0)):
P(Y = y) = q_i(y) min(1, p_i(y)/q_i(y)) + (1 - sum_v min(p_i, q_i)) p_{i+1}(y) = p_i(y). So Y ~ p_1 = p.
Removing x_i from q_{i+1} is consistent: x_i was rejected only if p_i(x_i) < q_i(x_i), so p_{i+1}(x_i) = 0.
After descending into an accepted child y, the grandchildren were drawn from the draft at y independently
of the accept/reject coins, and the node's children count is fixed by the static tree shape (it does not
depend on any sampled value), so the same argument applies at y with target p(. | prefix, y): by induction
over depth the emitted path is distributed as autoregressive sampling from p. With replacement (children
i.i.d. from q, q_i = q for all i) the same proof holds; `with_replacement=True` is provided for tests, the
engine draws without replacement (no wasted duplicate siblings).
Zero-probability children (the draft's support had fewer than m tokens) are never accepted (invalid).

Greedy (temperature 0): p and q are one-hot argmaxes; a draft is accepted iff it equals the target's
argmax, which is what the formulas above reduce to. Implemented separately as plain token comparisons.

Where we differ: nothing in the maths; floating-point guards (an empty residual falls back to p, which only
happens with probability 0 in exact arithmetic).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mtprl.rollout.sampling import sample_from_probs, uniform_noise
from mtprl.rollout.tree import TreeTensors


def chain_accept(target_probs: torch.Tensor, draft_probs: torch.Tensor, draft_tokens: torch.Tensor,
                 generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling along a chain of K drafts.

    target_probs [B,K+1,V]: p at the root and after each draft; draft_probs [B,K,V]: q that drew each draft
    (or [B,K+1,V] with a zero last row: q at the bonus position, saves a copy); draft_tokens [B,K].
    Returns num_accepted [B] (a in 0..K) and tokens [B,K+1]: tokens[:, :a] = the accepted drafts,
    tokens[:, a] = the residual / bonus sample, tokens[:, a+1:] = unused.
    """
    b, k1, v = target_probs.shape
    k = k1 - 1
    p_d = target_probs[:, :k].gather(-1, draft_tokens[..., None]).squeeze(-1)  # [B,K]
    q_d = draft_probs[:, :k].gather(-1, draft_tokens[..., None]).squeeze(-1)  # [B,K]
    u = uniform_noise((b, k), generator, target_probs.device)
    accept = u * q_d < p_d  # probability min(1, p/q)
    num_accepted = accept.long().cumprod(-1).sum(-1)  # [B]
    index = num_accepted[:, None, None].expand(b, 1, v)
    p_a = target_probs.gather(1, index).squeeze(1)  # [B,V]
    if draft_probs.shape[1] == k:
        draft_probs = torch.cat([draft_probs, draft_probs.new_zeros(b, 1, v)], dim=1)  # q = 0 at the bonus position
    q_a = draft_probs.gather(1, index).squeeze(1)
    final = sample_from_probs(_residual(p_a, q_a), generator)  # [B]
    tokens = F.pad(draft_tokens, (0, 1)).scatter_(1, num_accepted[:, None], final[:, None])
    return num_accepted, tokens


def greedy_chain_accept(target_tokens: torch.Tensor, draft_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """target_tokens [B,K+1] (argmax of p at each position), draft_tokens [B,K] -> (num_accepted [B],
    tokens [B,K+1]); accepted drafts equal the target tokens, so tokens = target_tokens."""
    match = (draft_tokens == target_tokens[:, :-1]).long()
    return match.cumprod(-1).sum(-1), target_tokens


def _residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """max(p - q, 0) (unnormalised), or p where that is all zero (only reached with probability 0)."""
    r = (p - q).clamp_(min=0.0)
    empty = r.sum(-1, keepdim=True) <= 0
    return torch.where(empty, p, r)


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return x / x.sum(-1, keepdim=True).clamp(min=torch.finfo(x.dtype).tiny)


def tree_accept(tree: TreeTensors, target_probs: torch.Tensor, draft_probs: torch.Tensor, node_tokens: torch.Tensor,
                node_valid: torch.Tensor, generator: torch.Generator | None, *, with_replacement: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Recursive rejection sampling over a static draft tree (see module docstring).

    target_probs [B,N,V]: p at each node (predicting its children); draft_probs [B,N,V]: q that drew each node's
    children; node_tokens [B,N] (root entry unused); node_valid [B,N]: False for children drawn outside q's
    support. Returns num_accepted [B], path [B,D] (accepted node ids by depth, 0 past num_accepted) and
    tokens [B,D+1] (accepted tokens then the final sample at index num_accepted), D = max depth.
    """
    b, n, v = target_probs.shape
    depth = tree.max_depth
    rows = torch.arange(b, device=target_probs.device)
    cur = torch.zeros(b, dtype=torch.long, device=rows.device)
    done = torch.zeros(b, dtype=torch.bool, device=rows.device)
    num_accepted = torch.zeros(b, dtype=torch.long, device=rows.device)
    path = torch.zeros(b, depth, dtype=torch.long, device=rows.device)
    final = torch.zeros(b, dtype=torch.long, device=rows.device)
    p_cur = target_probs[:, 0]
    for level in range(depth):
        q_cur = draft_probs[rows, cur]  # [B,V]
        nxt = torch.full_like(cur, -1)
        for rank in range(tree.children.shape[1]):
            child = tree.children[cur, rank]  # [B]
            c = child.clamp(min=0)
            x = node_tokens[rows, c]
            live = ~done & (nxt < 0) & (child >= 0) & node_valid[rows, c]
            px = p_cur.gather(1, x[:, None]).squeeze(1)
            qx = q_cur.gather(1, x[:, None]).squeeze(1)
            u = uniform_noise((b,), generator, rows.device)
            acc = live & (u * qx < px)
            rej = (live & ~acc)[:, None]
            nxt = torch.where(acc, c, nxt)
            p_cur = torch.where(rej, _normalise(_residual(p_cur, q_cur)), p_cur)
            if not with_replacement:
                q_cur = torch.where(rej, _normalise(q_cur.scatter(1, x[:, None], 0.0)), q_cur)
        moved = nxt >= 0
        stop = ~done & ~moved
        final = torch.where(stop, sample_from_probs(p_cur, generator), final)
        path[:, level] = torch.where(moved, nxt, 0)
        num_accepted += moved.long()
        done |= stop
        cur = torch.where(moved, nxt, cur)
        p_cur = torch.where(moved[:, None], target_probs[rows, cur], p_cur)
    final = torch.where(done, final, sample_from_probs(p_cur, generator))  # leaf reached: bonus from p
    tokens = torch.cat([node_tokens.gather(1, path), final[:, None]], dim=1)
    tokens.scatter_(1, num_accepted[:, None], final[:, None])
    return num_accepted, path, tokens


def greedy_tree_accept(tree: TreeTensors, target_tokens: torch.Tensor, node_tokens: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy tree walk: target_tokens [B,N] (argmax of p at each node), node_tokens [B,N] (siblings distinct).
    Descend into the child equal to the target token while one exists. Returns as tree_accept."""
    b = target_tokens.shape[0]
    depth = tree.max_depth
    rows = torch.arange(b, device=target_tokens.device)
    cur = torch.zeros(b, dtype=torch.long, device=rows.device)
    alive = torch.ones(b, dtype=torch.bool, device=rows.device)
    path = torch.zeros(b, depth, dtype=torch.long, device=rows.device)
    for level in range(depth):
        want = target_tokens[rows, cur]
        kids = tree.children[cur]  # [B,topk]
        kid_tokens = node_tokens.gather(1, kids.clamp(min=0))
        hit = (kids >= 0) & (kid_tokens == want[:, None]) & alive[:, None]
        found = hit.any(-1)
        nxt = kids.gather(1, hit.long().argmax(-1, keepdim=True)).squeeze(1)
        path[:, level] = torch.where(found, nxt, 0)
        cur = torch.where(found, nxt, cur)
        alive &= found
    num_accepted = (path > 0).long().cumprod(-1).sum(-1)
    final = target_tokens[rows, cur]
    tokens = torch.cat([node_tokens.gather(1, path), final[:, None]], dim=1)
    tokens.scatter_(1, num_accepted[:, None], final[:, None])
    return num_accepted, path, tokens
