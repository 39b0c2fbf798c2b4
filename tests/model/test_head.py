"""The chunked output head (mtprl/model/head.py) against full logits: values and gradients, hand-computed cases,
every mode, chunk sizes that do and do not divide the rows, temperature, bf16 autocast, and the model's
forward(scoring=...) against its reference path (every MTP loss type, tied / untied, the detach options, the
prefix grouper's unique tokens, recursive depths, gradient checkpointing)."""

import math

import pytest
import torch
import torch.nn.functional as F

from mtprl.model import CausalLM, ModelConfig, TokenScoring, mtp_loss, mtp_loss_from_scores
from mtprl.model.head import chunk_rows, linear_scores, logits_token_scores, reference_token_scores
from mtprl.trainer.batching import shared_prompt_tokens
from mtprl.trainer.policy import apply_gradient_checkpointing

LN2 = math.log(2.0)


def _hand_case():
    """V=3, H=1: logits z = W h = [0, ln 2, 0], p = [1/4, 1/2, 1/4]; the reference logits are 0 (q uniform)."""
    h = torch.tensor([[1.0]], requires_grad=True)
    w = torch.tensor([[0.0], [LN2], [0.0]], requires_grad=True)
    return h, w, torch.tensor([1]), torch.tensor([[1.0]]), torch.zeros(3, 1)


def test_hand_computed_logprob_entropy_and_gradients():
    h, w, y, _, _ = _hand_case()
    logp, ent, hit = linear_scores(h, w, y, entropy="grad", want_correct=True, chunk_size=1)
    torch.testing.assert_close(logp, torch.tensor([-LN2]))  # log 1/2
    torch.testing.assert_close(ent, torch.tensor([1.5 * LN2]))  # -(2 * 1/4 ln 1/4 + 1/2 ln 1/2)
    assert hit.tolist() == [True]
    d_h, d_w = torch.autograd.grad(logp.sum(), (h, w), retain_graph=True)  # dlogp/dz = e_y - p = [-1/4, 1/2, -1/4]
    torch.testing.assert_close(d_h, torch.tensor([[0.5 * LN2]]))  # sum_v (e_y - p)_v W_v
    torch.testing.assert_close(d_w, torch.tensor([[-0.25], [0.5], [-0.25]]))  # (e_y - p) h
    (d_w,) = torch.autograd.grad(ent.sum(), w)  # dH/dz = -p (log p + H) = [-1/4 (-2 + 1.5), -1/2 (-1 + 1.5), ...] ln 2
    torch.testing.assert_close(d_w, torch.tensor([[0.125 * LN2], [-0.25 * LN2], [0.125 * LN2]]))


def test_hand_computed_kl_and_tv():
    h, w, y, ref_h, ref_w = _hand_case()
    kl, _, _ = linear_scores(h, w, y, mode="kl", ref_hidden=ref_h, ref_weight=ref_w)
    tv, _, _ = linear_scores(h, w, y, mode="tv", ref_hidden=ref_h, ref_weight=ref_w)
    torch.testing.assert_close(kl, torch.tensor([math.log(32 / 27) / 3]))  # 1/3 (2 ln 4/3 + ln 2/3)
    torch.testing.assert_close(tv, torch.tensor([1 / 6]))  # 1/2 (2 |1/3 - 1/4| + |1/3 - 1/2|)
    kl.sum().backward()  # dKL/dz = p - q = [-1/12, 1/6, -1/12]
    torch.testing.assert_close(w.grad, torch.tensor([[-1 / 12], [1 / 6], [-1 / 12]]))


def _full(h, w, y, mode, temperature, ref_h, ref_w):
    """The same quantities from full logits, the plain autograd way (score [N], entropy [N])."""
    logp = torch.log_softmax(F.linear(h, w).float() / temperature, -1)
    ent = -(logp.exp() * logp).sum(-1)
    if mode == "logprob":
        return logp.gather(-1, y[:, None]).squeeze(-1), ent
    logq = torch.log_softmax(F.linear(ref_h, ref_w).float(), -1)
    if mode == "kl":
        return (logq.exp() * (logq - logp)).sum(-1), ent
    return 0.5 * (logq.exp() - logp.exp()).abs().sum(-1), ent


@pytest.mark.parametrize("mode,temperature", [("logprob", 1.0), ("logprob", 0.7), ("kl", 1.0), ("tv", 1.0)])
@pytest.mark.parametrize("entropy", ["none", "detached", "grad"])
@pytest.mark.parametrize("chunk", [1, 4, 5, 13, None])  # 13 rows: 4 and 5 do not divide them, None = one chunk
def test_linear_scores_equal_full_logits(mode, temperature, entropy, chunk):
    g = torch.Generator().manual_seed(0)
    n, hd, v = 13, 8, 37
    h0, w0 = torch.randn(n, hd, generator=g), torch.randn(v, hd, generator=g)
    y = torch.randint(v, (n,), generator=g)
    ref_h, ref_w = torch.randn(n, hd, generator=g), torch.randn(v, hd, generator=g)
    coef = torch.randn(n, generator=g)  # a weighted loss: every row's gradient differs
    h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    score, ent, hit = linear_scores(h, w, y, mode=mode, temperature=temperature, entropy=entropy, ref_hidden=ref_h,
                                    ref_weight=ref_w, want_correct=True, chunk_size=chunk)
    h_ref, w_ref = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    score_ref, ent_ref = _full(h_ref, w_ref, y, mode, temperature, ref_h, ref_w)
    torch.testing.assert_close(score, score_ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(hit, (F.linear(h0, w0) / temperature).argmax(-1) == y)
    loss, loss_ref = (coef * score).sum(), (coef * score_ref).sum()
    assert (ent is None) == (entropy == "none")
    if ent is not None:
        torch.testing.assert_close(ent, ent_ref, rtol=1e-5, atol=1e-6)
        assert ent.requires_grad == (entropy == "grad")
    if entropy == "grad":
        loss, loss_ref = loss + 0.3 * (coef * ent).sum(), loss_ref + 0.3 * (coef * ent_ref).sum()
    loss.backward()
    loss_ref.backward()
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-4, atol=1e-5)  # the entropy's gradient cancels terms
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["logprob", "kl", "tv"])
def test_gradcheck_in_fp64(mode):
    g = torch.Generator().manual_seed(1)
    h = torch.randn(7, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(11, 5, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.randint(11, (7,), generator=g)
    ref_h, ref_w = torch.randn(7, 5, dtype=torch.float64, generator=g), torch.randn(11, 5, dtype=torch.float64,
                                                                                    generator=g)

    def f(h, w):
        score, ent, _ = linear_scores(h, w, y, mode=mode, temperature=0.7 if mode == "logprob" else 1.0,
                                      entropy="grad", ref_hidden=ref_h, ref_weight=ref_w, chunk_size=3)
        return score, ent

    assert torch.autograd.gradcheck(f, (h, w))


def test_detached_weight_gets_no_gradient_and_no_rows_still_backpropagate():
    g = torch.Generator().manual_seed(2)
    h = torch.randn(6, 4, generator=g, requires_grad=True)
    w = torch.randn(9, 4, generator=g, requires_grad=True)
    y = torch.randint(9, (6,), generator=g)
    score, _, _ = linear_scores(h, w.detach(), y, chunk_size=4)
    score.sum().backward()
    assert w.grad is None and h.grad is not None
    empty, _, _ = linear_scores(h[:0], w, y[:0])  # a dummy micro-batch scores nothing, its backward reaches w
    (empty.sum() * 0.0).backward()
    assert torch.equal(w.grad, torch.zeros_like(w))


def test_chunk_rule():
    assert chunk_rows(151_936) == 441  # Qwen2.5's vocabulary: 256 MiB of fp32 per chunk
    assert chunk_rows(384) == 174_762  # the demo's: every micro-batch is one chunk
    assert chunk_rows(10, elements=5) == 1


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_reference_token_scores_equal_the_trainers_logits_path(temperature):
    """reference_token_scores is the maths the trainer ran before the chunked head (batching's function)."""
    g = torch.Generator().manual_seed(3)
    hidden, w = torch.randn(2, 6, 8, generator=g), torch.randn(30, 8, generator=g)
    ids, mask = torch.randint(30, (2, 6), generator=g), torch.randint(2, (2, 6), generator=g)
    logp, ent = reference_token_scores(hidden, w, ids, mask, temperature=temperature, entropy="detached")
    old_logp, old_ent = logits_token_scores(F.linear(hidden, w), ids, temperature, entropy="detached")
    assert torch.equal(logp, old_logp * mask) and torch.equal(ent, old_ent * mask)


def _batch(seed=0, n=4, prompt=3, width=9, vocab=64):
    """Right-padded rows, 2 per prompt: (input_ids, attention_mask, response_mask, group_ids)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, width), generator=g)
    ids[1::2, :prompt] = ids[0::2, :prompt]
    lengths = [width, width - 3, width - 1, prompt + 2][:n]
    attn = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).long()
    resp = attn.clone()
    resp[:, :prompt] = 0
    return ids * attn, attn, resp, torch.arange(n) // 2


def _scores_and_grads(model, batch, scoring, **forward):
    """Forward with `scoring`, a loss mixing every score, its value parts and every parameter's gradient."""
    ids, attn, resp, _ = batch
    model.zero_grad()
    out = model(ids, attention_mask=attn, scoring=scoring, **forward)
    coef = torch.linspace(-1.0, 1.0, ids.numel()).view(ids.shape)  # every position's gradient differs
    loss = (coef * out.token_logprobs).sum()
    if scoring.entropy == "grad":
        loss = loss + 0.3 * (coef * out.token_entropy).sum()
    parts = [out.token_logprobs] + ([out.token_entropy] if out.token_entropy is not None else [])
    if scoring.mtp_loss_mask is not None:
        m_loss, _ = mtp_loss_from_scores(out.mtp_token_losses, out.mtp_token_correct, resp, attention_mask=attn)
        loss = loss + m_loss
        parts += out.mtp_token_losses + [c.float() for c in out.mtp_token_correct]
    loss.backward()
    return [p.detach() for p in parts], {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


CASES = {
    "ce": dict(),
    "kl_tied_temperature": dict(loss_type="kl", tie=True, temperature=0.7),
    "tv_entropy_bonus": dict(loss_type="tv", entropy="grad"),
    "ce_unique_tokens_recursive": dict(unique=True, forward=dict(mtp_recursive_steps=3)),
    "ce_detach_encoder_tied": dict(tie=True, forward=dict(mtp_detach_encoder=True)),
    "kl_detach_head": dict(loss_type="kl", forward=dict(mtp_detach_head=True)),
    "trunk_only": dict(mtp=False, entropy="none"),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("chunk", [5, None])
def test_model_scoring_equals_the_full_logits_path(case, chunk):
    spec = CASES[case]
    torch.manual_seed(0)
    model = CausalLM(ModelConfig.tiny(vocab_size=64, tie_word_embeddings=spec.get("tie", False)))
    batch = _batch()
    ids, attn, resp, groups = batch
    forward = dict(spec.get("forward", {}))
    if spec.get("unique"):
        forward["unique_tokens"] = shared_prompt_tokens(ids, attn, resp, groups)
    forward["compute_mtp"] = spec.get("mtp", True)

    def scoring(reference):
        return TokenScoring(resp, temperature=spec.get("temperature", 1.0), entropy=spec.get("entropy", "detached"),
                            mtp_loss_mask=resp if spec.get("mtp", True) else None,
                            mtp_loss_type=spec.get("loss_type", "ce"), attention_mask=attn, chunk_size=chunk,
                            reference=reference)

    parts, grads = _scores_and_grads(model, batch, scoring(False), **forward)
    ref_parts, ref_grads = _scores_and_grads(model, batch, scoring(True), **forward)
    assert len(parts) == len(ref_parts)
    for a, b in zip(parts, ref_parts):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.parametrize("loss_type", ["ce", "kl", "tv"])
def test_model_mtp_scores_equal_mtp_loss_on_logits(loss_type):
    """The per-position MTP scores reduced by mtp_loss_from_scores give mtp_loss on the model's own logits."""
    torch.manual_seed(0)
    model = CausalLM(ModelConfig.tiny(vocab_size=64))
    ids, attn, resp, _ = _batch(seed=4)
    full = model(ids, attention_mask=attn)
    ref, ref_metrics = mtp_loss(full.mtp_logits, ids, resp, loss_type=loss_type, trunk_logits=full.logits,
                                attention_mask=attn, num_valid=[20, 17])
    out = model(ids, attention_mask=attn, scoring=TokenScoring(resp, mtp_loss_mask=resp, mtp_loss_type=loss_type,
                                                               attention_mask=attn, chunk_size=3))
    assert out.logits is None and out.mtp_logits == []
    loss, metrics = mtp_loss_from_scores(out.mtp_token_losses, out.mtp_token_correct, resp, attention_mask=attn,
                                         num_valid=[20, 17])
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-7)
    assert metrics.keys() == ref_metrics.keys()
    for k in metrics:
        assert metrics[k] == pytest.approx(ref_metrics[k], rel=1e-5, abs=1e-7), k


def test_bf16_autocast_matches_the_full_logits_path():
    """Under bf16 autocast the chunks' matmuls are bf16 and the rest fp32, as F.linear + log-softmax there: one
    chunk gives the reference's values; several differ only by the weight gradient's sum over chunks (fp32 here,
    one bf16 product there)."""
    torch.manual_seed(0)
    model = CausalLM(ModelConfig.tiny(vocab_size=64))
    batch = _batch(seed=5)
    resp, attn = batch[2], batch[1]
    results = {}
    for name, chunk, reference in (("ref", None, True), ("one", None, False), ("many", 4, False)):
        scoring = TokenScoring(resp, temperature=0.7, entropy="grad", mtp_loss_mask=resp, attention_mask=attn,
                               chunk_size=chunk, reference=reference)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results[name] = _scores_and_grads(model, batch, scoring)
    (ref_parts, ref_grads) = results["ref"]
    for name in ("one", "many"):
        parts, grads = results[name]
        for a, b in zip(parts, ref_parts):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        for k in ref_grads:
            scale = float(ref_grads[k].abs().max())
            assert float((grads[k] - ref_grads[k]).abs().max()) <= 2e-2 * scale, (name, k)
        assert all(g.dtype == torch.float32 for g in grads.values())


def test_gradient_checkpointing_gives_the_same_gradients():
    """The hidden states entering the chunked head come out of checkpointed blocks: same values and gradients as
    the plain model on the full logits."""
    torch.manual_seed(0)
    model = CausalLM(ModelConfig.tiny(vocab_size=64))
    batch = _batch(seed=6)
    resp, attn = batch[2], batch[1]
    ref_parts, ref_grads = _scores_and_grads(model, batch, TokenScoring(resp, entropy="grad", mtp_loss_mask=resp,
                                                                        attention_mask=attn, reference=True))
    apply_gradient_checkpointing(model)
    parts, grads = _scores_and_grads(model, batch, TokenScoring(resp, entropy="grad", mtp_loss_mask=resp,
                                                                attention_mask=attn, chunk_size=3))
    for a, b in zip(parts, ref_parts):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-6, msg=k)
