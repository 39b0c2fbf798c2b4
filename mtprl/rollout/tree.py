"""Static draft-tree shapes for speculative decoding (a chain is the tree with one child per node).

A tree has N nodes in breadth-first order: node 0 is the ROOT (the last committed token, which the trunk has
not processed yet), nodes 1..N-1 are draft tokens. Node n has a depth (root 0), a parent, and a rank among
its siblings: rank r means "the r-th token drawn, in order, from the parent's draft distribution" (drawn
without replacement, see acceptance.py). Sibling ranks are always a prefix 0..m-1, which the exactness
argument of the recursive rejection scheme needs (a rank-1 child is only meaningful after rank 0).

Shape choice (SpecInfer / Sequoia use static trees; EAGLE-2 re-ranks nodes by the draft's own scores, which
at temperature > 0 would make the kept children depend on their sampled values and break exactness, so we
don't): best-first on a prior score, score(path) = prod_j w(rank_j), w(r) = a (1 - a)^r with a = 0.6 the
prior acceptance of a rank-0 draft. w is decreasing, so every selected node's parent and elder siblings
are selected first. The shape depends only on (num_steps, eagle_topk, num_draft_tokens), never on the data.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass(frozen=True)
class DraftTree:
    """parents[n] (-1 for the root), depths[n], ranks[n] for n in 0..N-1, breadth-first; topk = max children."""

    parents: tuple[int, ...]
    depths: tuple[int, ...]
    ranks: tuple[int, ...]
    topk: int

    @property
    def num_nodes(self) -> int:
        return len(self.parents)

    @property
    def max_depth(self) -> int:
        return max(self.depths)

    @property
    def is_chain(self) -> bool:
        return self.num_nodes == self.max_depth + 1

    @cached_property
    def children(self) -> tuple[tuple[int, ...], ...]:
        """children[n] = node ids of n's children by rank, padded with -1 to topk."""
        kids: list[list[int]] = [[-1] * self.topk for _ in range(self.num_nodes)]
        for n in range(1, self.num_nodes):
            kids[self.parents[n]][self.ranks[n]] = n
        return tuple(tuple(k) for k in kids)

    @cached_property
    def level_ranges(self) -> tuple[tuple[int, int], ...]:
        """level_ranges[e] = (start, end) node ids of depth e (contiguous in breadth-first order)."""
        out = []
        for e in range(self.max_depth + 1):
            ids = [n for n in range(self.num_nodes) if self.depths[n] == e]
            out.append((ids[0], ids[-1] + 1))
        return tuple(out)

    @cached_property
    def ancestors(self) -> torch.Tensor:
        """[N,N] bool, [n, m] = m is n or an ancestor of n (the root is everyone's ancestor)."""
        anc = torch.eye(self.num_nodes, dtype=torch.bool)
        for n in range(1, self.num_nodes):
            anc[n] |= anc[self.parents[n]]
        return anc

    def truncate(self, depth: int) -> "DraftTree":
        """The sub-tree of nodes with depth <= depth (still breadth-first and rank-prefix closed)."""
        keep = [n for n in range(self.num_nodes) if self.depths[n] <= depth]
        return DraftTree(parents=tuple(self.parents[n] for n in keep), depths=tuple(self.depths[n] for n in keep),
                         ranks=tuple(self.ranks[n] for n in keep), topk=self.topk)

    def tensors(self, device: torch.device) -> "TreeTensors":
        levels = []
        for start, end in self.level_ranges:
            kids = [(n - start, self.ranks[c], c) for n in range(start, end) for c in self.children[n] if c >= 0]
            levels.append(None if not kids else LevelChildren(
                parent_pos=torch.tensor([k[0] for k in kids], device=device),
                rank=torch.tensor([k[1] for k in kids], device=device),
                child=torch.tensor([k[2] for k in kids], device=device),
                num=max(k[1] for k in kids) + 1))
        return TreeTensors(
            node_ids=torch.arange(self.num_nodes, device=device),
            parents=torch.tensor(self.parents, device=device).clamp(min=0),
            depths=torch.tensor(self.depths, device=device),
            children=torch.tensor(self.children, device=device),
            ancestors=self.ancestors.to(device),
            level_children=tuple(levels),
            max_depth=self.max_depth,
        )


@dataclass(frozen=True)
class LevelChildren:
    """The children of one tree level: child ids [C], the position of their parent within the level [C], their
    rank [C]; num = children drawn per parent (max rank + 1)."""

    parent_pos: torch.Tensor
    rank: torch.Tensor
    child: torch.Tensor
    num: int


@dataclass(frozen=True)
class TreeTensors:
    """The tree on a device: node_ids [N] = arange, parents [N] (root -> 0), depths [N], children [N,topk]
    (-1 = none), ancestors [N,N] bool, level_children[e] = the children of level e (None for a level of leaves);
    max_depth on the host."""

    node_ids: torch.Tensor
    parents: torch.Tensor
    depths: torch.Tensor
    children: torch.Tensor
    ancestors: torch.Tensor
    level_children: tuple = ()
    max_depth: int = 0


def chain_tree(num_steps: int) -> DraftTree:
    """A chain root -> d_1 -> ... -> d_K."""
    return DraftTree(parents=tuple(range(-1, num_steps)), depths=tuple(range(num_steps + 1)),
                     ranks=(0,) * (num_steps + 1), topk=1)


def build_tree(num_steps: int, topk: int, num_draft_tokens: int, prior_accept: float = 0.6) -> DraftTree:
    """Best-first static tree: the num_draft_tokens - 1 draft nodes of highest prior score (see module doc),
    depth <= num_steps, at most topk children per node, in breadth-first order."""
    if topk == 1:
        if num_draft_tokens != num_steps + 1:
            raise ValueError(f"a chain of {num_steps} steps verifies {num_steps + 1} tokens, got {num_draft_tokens}")
        return chain_tree(num_steps)
    if not 0.0 < prior_accept < 1.0:
        raise ValueError(f"prior_accept must be in (0, 1), got {prior_accept}")
    weight = [prior_accept * (1 - prior_accept) ** r for r in range(topk)]
    # heap items: (-score, depth, path) ; path = tuple of ranks from the root
    heap = [(-weight[r], 1, (r,)) for r in range(topk)]
    heapq.heapify(heap)
    chosen: list[tuple[int, ...]] = []
    while heap and len(chosen) < num_draft_tokens - 1:
        neg_score, depth, path = heapq.heappop(heap)
        chosen.append(path)
        if depth < num_steps:
            for r in range(topk):
                heapq.heappush(heap, (neg_score * weight[r], depth + 1, path + (r,)))
    if len(chosen) < num_draft_tokens - 1:
        raise ValueError(f"num_draft_tokens={num_draft_tokens} exceeds the nodes of a depth-{num_steps}, "
                         f"top-{topk} tree")
    chosen.sort(key=lambda p: (len(p), p))  # breadth-first; within a level parents' order then rank
    index = {(): 0}
    parents, depths, ranks = [-1], [0], [0]
    for n, path in enumerate(chosen, start=1):
        index[path] = n
        parents.append(index[path[:-1]])
        depths.append(len(path))
        ranks.append(path[-1])
    return DraftTree(parents=tuple(parents), depths=tuple(depths), ranks=tuple(ranks), topk=topk)
