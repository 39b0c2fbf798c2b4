"""The output head fused with its log-softmax, over token chunks: per-token log-probs, entropies and MTP losses
without a [tokens, V] logits tensor (fused linear cross-entropy, as Liger-Kernel's FusedLinearCrossEntropy and
Apple's Cut Cross-Entropy, Wijmans et al. 2024, do it).

For N rows with final-normed hidden states h_n [H], the head W [V,H], temperature tau and target tokens y_n:

    z_n    = W h_n / tau                              logits [V] (the matmul in the compute dtype, then fp32)
    logp_n = z_n[y_n] - logsumexp(z_n)                "logprob": the target's log-probability
    H_n    = logsumexp(z_n) - sum_v p_nv z_nv         entropy of p_n = softmax(z_n)
    KL_n   = sum_v q_nv (log q_nv - log p_nv)         "kl": to q_n = softmax(W_r r_n), reference rows (detached)
    TV_n   = 1/2 sum_v |q_nv - p_nv|                  "tv"

The forward keeps only per-row numbers; the backward recomputes each chunk's logits and forms the gradient
wrt z in place of them, then dL/dh = dz W / tau and dL/dW = sum_n dz_n h_n^T / tau (accumulated in fp32):

    logp: g (e_y - p)      H: -g p * (log p + H)      KL: g (p - q)      TV: g/2 p * (s - <s, p>), s = sign(p - q)

So at most one chunk of `chunk_rows(V)` rows exists as [rows, V] fp32 at any time (a few buffers of it), forward
and backward, whatever the micro-batch's token count. Precision follows `F.linear` under autocast: under bf16
autocast (or bf16 hidden states and weights: FSDP2's mixed precision) the matmuls run in bf16, everything
per-vocabulary in fp32, as the full-logits path (`reference_token_scores`, the slow reference) does it.

`token_scores` / `mtp_token_scores` are what `CausalLM.forward(scoring=TokenScoring(...))` runs: inside the
model's own call, so that FSDP2's hooks have gathered the head (a sharded parameter outside it).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

MODES = ("logprob", "kl", "tv")
ENTROPY_MODES = ("none", "detached", "grad")
# Elements of one [rows, V] fp32 chunk: 2^26 (256 MiB) is 441 rows at V = 151,936 and the whole micro-batch at
# the demo's V = 384. On the 2-core CPU the head's forward + backward at Qwen2.5's H = 896, V = 151,936 took the
# same time per row at 441, 882 and 1323 rows (within the machine's noise; docs/performance.md), so a larger chunk
# buys no speed for its memory.
CHUNK_ELEMENTS = 2 ** 26
_GRAD_BLOCK = 16384  # vocabulary rows per bf16 block of the weight gradient before its fp32 sum


def chunk_rows(vocab_size: int, elements: int | None = None) -> int:
    """Rows per chunk so that one [rows, V] fp32 buffer holds at most `elements` values (default CHUNK_ELEMENTS),
    at least 1 row."""
    return max(1, (CHUNK_ELEMENTS if elements is None else elements) // vocab_size)


@dataclass(frozen=True)
class TokenScoring:
    """What `CausalLM.forward(scoring=...)` computes from the final hidden states instead of [B,T,V] logits.

    score_mask [B,T]: 1 = token t is scored: token_logprobs[:, t] = log softmax(head(h^0_{t-1}) / temperature)
        [input_ids[:, t]] (0 where the mask is 0, and at t = 0, as `trainer.batching.token_logprobs`).
    temperature: divides the trunk's logits (1 = none); the MTP losses never use it (as `mtp_loss`).
    entropy: "none" (token_entropy None), "detached" (a metric: computed without a graph) or "grad" (an entropy
        bonus: gradients flow), at the scored tokens, aligned like token_logprobs.
    mtp_loss_mask [B,T] | None: the MTP per-position losses of `mtp.mtp_loss` with this loss_mask (and
        `attention_mask`), at its counted positions (None: none computed); mtp_loss_type "ce", "kl" or "tv".
    chunk_size: rows per chunk (None: chunk_rows(V)).
    reference: compute the same from the full [B,T,V] logits instead (the slow reference: `reference_token_scores`,
        `mtp.reference_mtp_token_scores`), for tests and measurements.
    """

    score_mask: torch.Tensor
    temperature: float = 1.0
    entropy: str = "none"
    mtp_loss_mask: torch.Tensor | None = None
    mtp_loss_type: str = "ce"
    attention_mask: torch.Tensor | None = None
    chunk_size: int | None = None
    reference: bool = False

    def __post_init__(self) -> None:
        if self.entropy not in ENTROPY_MODES:
            raise ValueError(f"entropy={self.entropy!r} is not one of {ENTROPY_MODES}")


def compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The matmul dtype of F.linear(hidden, weight) here: autocast's when it is on, else the inputs' promotion."""
    device = hidden.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):  # (no autocast on meta)
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _no_autocast(device: str):
    """Autocast off inside (the chunks' casts are explicit); nothing to do where it is not on (or not available,
    e.g. on the meta device)."""
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.autocast(device, enabled=False)
    return contextlib.nullcontext()


def head_for_matmul(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The head [V,H] detached, in the compute dtype: what the chunks' matmuls read (a no-op in fp32)."""
    return weight.detach().to(compute_dtype(hidden, weight))


class _Workspace:
    """The [rows, V] buffers of one forward or backward call, allocated once and reused by every chunk: a fresh
    buffer per chunk (256 MiB at the chunk size) is a fresh mmap whose pages all fault on first touch (fresh
    buffers cost 41 s of system time against 13 s reused, over benchmarks/memory_real_shapes.py's two 2-layer
    updates on CPU)."""

    def __init__(self, rows: int, like: torch.Tensor, vocab: int) -> None:
        self.rows, self.vocab, self.device = rows, vocab, like.device
        self.mm_dtype = like.dtype  # the matmuls' dtype (bf16 under autocast)
        self.dtype = torch.promote_types(like.dtype, torch.float32)  # everything per-vocabulary (fp64 for fp64)
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, rows: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Buffer `name` as [rows, V] (rows <= the chunk size) in `dtype` (default fp32)."""
        if name not in self._buffers:
            self._buffers[name] = torch.empty(self.rows, self.vocab, dtype=dtype or self.dtype, device=self.device)
        return self._buffers[name][:rows]

    def like(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """Buffer `name` shaped and typed as t; the first call's shape (a last, smaller block gets a view)."""
        if name not in self._buffers:
            self._buffers[name] = torch.empty_like(t)
        return self._buffers[name][: t.shape[0]]

    def logits(self, name: str, h: torch.Tensor, w: torch.Tensor, temperature: float) -> torch.Tensor:
        """[c,H] x [V,H] -> logits [c,V] / temperature in buffer `name` (fp32), the matmul in the inputs' dtype."""
        z = self.get(name, h.shape[0])
        if self.mm_dtype == self.dtype:
            torch.mm(h, w.T, out=z)
        else:
            z.copy_(torch.mm(h, w.T, out=self.get("mm", h.shape[0], self.mm_dtype)))
        return z.div_(temperature) if temperature != 1.0 else z

    def softmax(self, name: str, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(p = softmax(z) in buffer `name`, logsumexp(z) [c]) with no other [c,V] temporary."""
        m = z.amax(-1, keepdim=True)
        p = torch.sub(z, m, out=self.get(name, z.shape[0])).exp_()
        total = p.sum(-1, keepdim=True)
        return p.div_(total), (m + total.log()).squeeze(-1)


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[c,V], [c,V] -> [c]: sum_v a * b without a [c,V] temporary."""
    return torch.bmm(a[:, None, :], b[:, :, None]).view(-1)


class _ChunkedHead(torch.autograd.Function):
    """(score [N], entropy [N] or [0], correct [N] or [0]) of rows h [N,H] under head W [V,H]; see the module
    docstring. h, w_mm (W detached, shared by the calls of one forward), ref_h / ref_w (kl / tv, detached) in the
    compute dtype; w only receives the gradient, in its own dtype (summed over chunks in fp32, never rounded to
    bf16 on the way); correct = argmax z == y (no gradient), computed when want_correct. Buffers: z (logits, then
    log p), p, for kl / tv r (the reference's log q) and q; "mm" the bf16 matmul output, "dw" a block of one
    chunk's bf16 weight gradient."""

    @staticmethod
    def forward(ctx, h, w, w_mm, y, ref_h, ref_w, mode: str, temperature: float, entropy: bool, entropy_grad: bool,
                want_correct: bool, chunk: int):
        n = h.shape[0]
        ws = _Workspace(min(chunk, n), h, w_mm.shape[0])
        f32 = dict(dtype=ws.dtype, device=h.device)
        score = torch.zeros(n, **f32)
        ent = torch.zeros(n if entropy else 0, **f32)
        correct = torch.zeros(n if want_correct else 0, dtype=torch.bool, device=h.device)
        lse = torch.zeros(n, **f32)  # logsumexp z, kept for the backward
        ref_lse = torch.zeros(n if mode != "logprob" else 0, **f32)
        with _no_autocast(h.device.type):
            for s in range(0, n, chunk):
                e = min(s + chunk, n)
                z = ws.logits("z", h[s:e], w_mm, temperature)  # [c,V]
                if want_correct:
                    correct[s:e] = z.argmax(-1) == y[s:e]
                p, lse[s:e] = ws.softmax("p", z)
                if mode == "logprob":
                    score[s:e] = z.gather(-1, y[s:e, None]).squeeze(-1) - lse[s:e]
                    if not entropy:
                        continue
                logp = z.sub_(lse[s:e, None])
                if entropy:
                    ent[s:e] = -_rowdot(p, logp)
                if mode != "logprob":
                    logq = ws.logits("r", ref_h[s:e], ref_w, 1.0)
                    q, ref_lse[s:e] = ws.softmax("q", logq)
                    logq.sub_(ref_lse[s:e, None])
                    if mode == "kl":
                        score[s:e] = _rowdot(q, logq.sub_(logp))
                    else:
                        score[s:e] = 0.5 * q.sub_(p).abs_().sum(-1)
        ctx.mark_non_differentiable(correct)
        if not entropy_grad:
            ctx.mark_non_differentiable(ent)
        ctx.save_for_backward(h, w_mm, y, ref_h, ref_w, lse, ref_lse, ent)
        ctx.mode, ctx.temperature, ctx.entropy_grad, ctx.chunk = mode, temperature, entropy_grad, chunk
        ctx.w_dtype = w.dtype
        ctx.set_materialize_grads(False)
        return score, ent, correct

    @staticmethod
    def backward(ctx, g_score, g_ent, _g_correct):
        h, w, y, ref_h, ref_w, lse, ref_lse, ent = ctx.saved_tensors  # w: w_mm
        mode, temperature, chunk = ctx.mode, ctx.temperature, ctx.chunk
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not ctx.entropy_grad:
            g_ent = None
        n = h.shape[0]
        ws = _Workspace(min(chunk, n), h, w.shape[0])
        grad_h = torch.zeros_like(h) if need_h else None
        grad_w = torch.zeros(w.shape, dtype=ws.dtype, device=w.device) if need_w else None  # summed in fp32
        if (g_score is None and g_ent is None) or not (need_h or need_w):
            return grad_h, None if grad_w is None else grad_w.to(ctx.w_dtype), *([None] * 10)
        with _no_autocast(h.device.type):
            for s in range(0, n, chunk):
                e = min(s + chunk, n)
                logp = ws.logits("z", h[s:e], w, temperature).sub_(lse[s:e, None])  # [c,V]
                if g_ent is not None:  # p in its own buffer; -g p (log p + H) in logp's
                    dz = torch.exp(logp, out=ws.get("p", e - s))
                    logp.add_(ent[s:e, None]).mul_(dz).mul_(-g_ent[s:e, None])
                else:
                    dz = logp.exp_()  # p, in place: one [c,V] buffer less
                # dz: p, becomes dL/dz in place
                if g_score is None:
                    dz.zero_()
                elif mode == "logprob":
                    gs = g_score[s:e, None]
                    dz.mul_(-gs).scatter_add_(-1, y[s:e, None], gs)
                else:
                    gs = g_score[s:e, None]
                    q = ws.logits("r", ref_h[s:e], ref_w, 1.0).sub_(ref_lse[s:e, None]).exp_()
                    if mode == "kl":
                        dz.sub_(q).mul_(gs)
                    else:  # 1/2 p (s - <s, p>), s = sign(p - q)
                        sign = q.sub_(dz).neg_().sign_()
                        dz.mul_(sign.sub_(_rowdot(sign, dz)[:, None])).mul_(0.5 * gs)
                if g_ent is not None:
                    dz.add_(logp)
                if temperature != 1.0:
                    dz.div_(temperature)
                if ws.mm_dtype != ws.dtype:
                    dz = ws.get("mm", e - s, ws.mm_dtype).copy_(dz)
                if need_h:
                    torch.mm(dz, w, out=grad_h[s:e])
                if need_w and dz.dtype == grad_w.dtype:
                    grad_w.addmm_(dz.T, h[s:e])
                elif need_w:  # bf16 products summed in fp32, by blocks of the vocabulary (a mixed-dtype add_
                    for v in range(0, w.shape[0], _GRAD_BLOCK):  # converts its whole operand first)
                        part = torch.mm(dz[:, v:v + _GRAD_BLOCK].T, h[s:e], out=ws.like("dw", w[v:v + _GRAD_BLOCK]))
                        grad_w[v:v + _GRAD_BLOCK].add_(part)
        return grad_h, None if grad_w is None else grad_w.to(ctx.w_dtype), *([None] * 10)


def linear_scores(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, mode: str = "logprob",
                  temperature: float = 1.0, entropy: str = "none", ref_hidden: torch.Tensor | None = None,
                  ref_weight: torch.Tensor | None = None, want_correct: bool = False,
                  weight_mm: torch.Tensor | None = None,
                  chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Rows hidden [N,H] through the head weight [V,H], in chunks of `chunk_size` rows (None: chunk_rows(V)).
    weight_mm: weight detached and cast to the compute dtype (`head_for_matmul`), to share one bf16 copy between
    calls (default: this call's own).
    Returns (score [N] fp32: the targets' [N] log-probs (mode "logprob") or KL / TV to the reference rows
    ref_hidden [N,H] under ref_weight [V,H] (modes "kl", "tv"; the reference is detached); entropy [N] fp32 or
    None (entropy "none"; "detached": no gradient; "grad"); correct [N] bool, argmax of the logits == target, or
    None without want_correct)."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {MODES}")
    if entropy not in ENTROPY_MODES:
        raise ValueError(f"entropy={entropy!r} is not one of {ENTROPY_MODES}")
    if mode != "logprob" and (ref_hidden is None or ref_weight is None):
        raise ValueError(f"mode={mode!r} needs ref_hidden and ref_weight")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    dtype = compute_dtype(hidden, weight)
    w_mm = head_for_matmul(hidden, weight) if weight_mm is None else weight_mm
    ref_h = ref_w = None
    if mode != "logprob":
        ref_h, ref_w = ref_hidden.detach().to(dtype), ref_weight.detach().to(dtype)
    chunk = chunk_size or chunk_rows(weight.shape[0])
    score, ent, correct = _ChunkedHead.apply(hidden.to(dtype), weight, w_mm, targets, ref_h, ref_w, mode,
                                             float(temperature),
                                             entropy != "none", entropy == "grad", want_correct, chunk)
    return score, (ent if entropy != "none" else None), (correct if want_correct else None)


def token_scores(hidden: torch.Tensor, weight: torch.Tensor, input_ids: torch.Tensor, score_mask: torch.Tensor, *,
                 temperature: float = 1.0, entropy: str = "none", weight_mm: torch.Tensor | None = None,
                 chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """hidden [B,T,H] (trunk h^0), weight [V,H], input_ids [B,T], score_mask [B,T] -> (token_logprobs [B,T],
    token_entropy [B,T] or None), out[:, t] from hidden[:, t-1] for token t, 0 where score_mask is 0 and at t = 0
    (as logits_token_scores on the full logits)."""
    pos = score_mask[:, 1:].bool()  # [B,T-1]: position t-1 scores token t
    logp, ent, _ = linear_scores(hidden[:, :-1][pos], weight, input_ids[:, 1:][pos], temperature=temperature,
                                 entropy=entropy, weight_mm=weight_mm, chunk_size=chunk_size)

    def place(values: torch.Tensor) -> torch.Tensor:  # [N] -> [B,T]
        return F.pad(values.new_zeros(pos.shape).masked_scatter(pos, values), (1, 0))

    return place(logp), (None if ent is None else place(ent))


def logits_token_scores(logits: torch.Tensor, input_ids: torch.Tensor, temperature: float = 1.0, *,
                        entropy: str = "none") -> tuple[torch.Tensor, torch.Tensor | None]:
    """(token_logprobs [B,T], token_entropy [B,T] or None) from full logits [B,T,V] with ONE fp32 log_softmax over
    the vocabulary: the path before the chunked head, kept as its slow reference (trainer.batching's
    token_logprobs / token_entropy are this function's references). out[:, t] scores token t from logits[:, t-1];
    out[:, 0] = 0. entropy: "none" (None), "detached" (no graph through it) or "grad" (gradients flow)."""
    z = logits[:, :-1].float()
    if temperature not in (0.0, 1.0):
        z = z / temperature
    logp_all = torch.log_softmax(z, dim=-1)  # [B,T-1,V]
    logp = F.pad(logp_all.gather(-1, input_ids[:, 1:, None]).squeeze(-1), (1, 0))
    if entropy == "none":
        return logp, None
    src = logp_all if entropy == "grad" else logp_all.detach()
    with torch.set_grad_enabled(entropy == "grad" and torch.is_grad_enabled()):
        ent = F.pad(-(src.exp() * src).sum(-1), (1, 0))
    return logp, ent


def reference_token_scores(hidden: torch.Tensor, weight: torch.Tensor, input_ids: torch.Tensor,
                           score_mask: torch.Tensor, *, temperature: float = 1.0,
                           entropy: str = "none") -> tuple[torch.Tensor, torch.Tensor | None]:
    """token_scores from the full logits F.linear(hidden, weight) [B,T,V] (logits_token_scores), then zero where
    score_mask is 0."""
    logp, ent = logits_token_scores(F.linear(hidden, weight), input_ids, temperature, entropy=entropy)
    keep = score_mask.to(torch.float32)
    return logp * keep, (None if ent is None else ent * keep)
