"""The trainer on the chunked head (#28 item 4): the update, the old / reference log-probs and SFT give what the
full-logits path gives, and no operator of a micro-batch's forward or backward makes more than one chunk of
[rows, V] values (the full-logits path makes the micro-batch's [B*T, V], which the same check catches)."""

import copy
import dataclasses
import functools
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import mtprl.model.head
from mtprl.model import CausalLM, ModelConfig, TokenScoring
from mtprl.model.head import logits_token_scores
from mtprl.trainer import sft, update
from mtprl.trainer.update import TrainBatch, compute_logprobs

from tests.trainer.updates import sgd_delta, train_batch, update_cfg

V = 96  # differs from hidden (32) and intermediate (64): a [*, V] tensor is a vocabulary one


def _batch(seed=0) -> TrainBatch:
    """6 samples in groups of 2 sharing a 3-token prompt; responses of 2..7 tokens, right-padded."""
    return train_batch(vocab=V, seed=seed, min_len=2, max_len=7, shared_prompts=True)


def _cfg(*extra):
    return update_cfg("data.max_response_length=8", *extra)


def _model(**overrides):
    torch.manual_seed(0)
    return CausalLM(ModelConfig.tiny(vocab_size=V, **overrides))


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 5 rows at V (the micro-batches here have 20-40 scored rows: several chunks, a partial last)."""
    monkeypatch.setattr(mtprl.model.head, "CHUNK_ELEMENTS", 5 * V)


@pytest.mark.parametrize("extra", [
    [],
    ["actor_rollout_ref.actor.entropy_coeff=0.01", "actor_rollout_ref.rollout.temperature=0.7"],
    ["actor_rollout_ref.model.mtp.loss_type=kl", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2"],
    ["actor_rollout_ref.model.mtp.loss_type=tv", "actor_rollout_ref.actor.use_kl_loss=True",
     "actor_rollout_ref.actor.use_prefix_grouper=False"],
    ["actor_rollout_ref.model.mtp.recursive_steps=3", "actor_rollout_ref.model.mtp.detach_encoder=True"],
])
@pytest.mark.parametrize("tied", [False, True])
def test_update_equals_the_full_logits_update(extra, tied, small_chunks, monkeypatch):
    model = _model(tie_word_embeddings=tied)
    batch = _batch()
    cfg = _cfg(*extra)
    batch.old_logprobs = compute_logprobs(model, batch, cfg) + 0.05 * batch.response_mask  # ratios != 1
    batch.ref_logprobs = compute_logprobs(model, batch, cfg, role="ref") - 0.1 * batch.response_mask
    chunked, m_chunked, _ = sgd_delta(model, batch, cfg)
    with monkeypatch.context() as m:
        m.setattr(update, "TokenScoring", functools.partial(TokenScoring, reference=True))
        full, m_full, _ = sgd_delta(model, batch, cfg)
    for k in full:
        torch.testing.assert_close(chunked[k], full[k], rtol=1e-4, atol=1e-6, msg=k)
    assert m_chunked.keys() == m_full.keys()
    for k in m_full:
        assert m_chunked[k] == pytest.approx(m_full[k], rel=1e-4, abs=1e-6), k


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_compute_logprobs_equals_the_logits_path(temperature, small_chunks):
    model = _model()
    batch = _batch(seed=1)
    cfg = _cfg(f"actor_rollout_ref.rollout.temperature={temperature}")
    with torch.no_grad():  # what compute_logprobs returned before: every real token's log-prob from full logits
        old = logits_token_scores(model(batch.input_ids, attention_mask=batch.attention_mask,
                                               compute_mtp=False).logits, batch.input_ids, temperature)[0]
    torch.testing.assert_close(compute_logprobs(model, batch, cfg), old * batch.attention_mask, rtol=1e-5,
                               atol=1e-6)


def _sft_examples(seed=2, n=5):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 6 + 2 * i
        prompt = 3
        out.append(SimpleNamespace(input_ids=torch.randint(1, V, (length,), generator=g).tolist(),
                                   loss_mask=[0] * prompt + [1] * (length - prompt)))
    return out


def _sft_grads(model, examples, cfg, train_trunk=True):
    model = copy.deepcopy(model)
    loss, metrics = sft.sft_loss(model, examples, pad_id=0, num_targets=30, train_trunk=train_trunk, train_mtp=True,
                                 cfg=cfg, mtp_counts=sft.batch_mtp_counts(model, examples, cfg))
    loss.backward()
    return {k: p.grad for k, p in model.named_parameters() if p.grad is not None}, metrics


@pytest.mark.parametrize("train_trunk", [True, False])
def test_sft_loss_equals_the_full_logits_loss(train_trunk, small_chunks, monkeypatch):
    model = _model()
    examples = _sft_examples()
    cfg = _cfg("actor_rollout_ref.model.mtp.recursive_steps=3")
    chunked, m_chunked = _sft_grads(model, examples, cfg, train_trunk)
    with monkeypatch.context() as m:
        m.setattr(sft, "TokenScoring", functools.partial(TokenScoring, reference=True))
        full, m_full = _sft_grads(model, examples, cfg, train_trunk)
    assert chunked.keys() == full.keys()
    for k in full:
        torch.testing.assert_close(chunked[k], full[k], rtol=1e-4, atol=1e-6, msg=k)
    for k in m_full:
        assert m_chunked[k] == pytest.approx(m_full[k], rel=1e-5, abs=1e-7), k


class WidestVocabularyTensor(TorchDispatchMode):
    """Records the most rows of any [..., V] tensor an operator makes (views excluded: they add no memory)."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab, self.rows, self.op = vocab, 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):  # a view or an in-place op: no new memory
            return out
        for t in tree_flatten(out)[0]:
            is_vocab = isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[-1] == self.vocab
            if is_vocab and t.numel() // self.vocab > self.rows:
                self.rows, self.op = t.numel() // self.vocab, str(func)
        return out


def _widest_in_a_micro_batch(model, batch, cfg) -> WidestVocabularyTensor:
    """The widest [rows, V] tensor of one micro-batch's loss, forward and backward, and of an old-log-prob pass."""
    norms = (int(batch.response_mask.sum()), len(batch))
    depths = model.num_mtp_depths(cfg.actor_rollout_ref.model.mtp.recursive_steps)
    mtp_counts = update.mtp_valid_counts(batch.response_mask, depths, batch.attention_mask)
    with WidestVocabularyTensor(V) as widest:
        loss, _ = update._micro_loss(model, batch, cfg, norms, mtp_counts)
        loss.backward()
        compute_logprobs(model, batch, cfg)
    return widest


@pytest.mark.parametrize("extra", [[], ["actor_rollout_ref.actor.entropy_coeff=0.01",
                                        "actor_rollout_ref.model.mtp.loss_type=kl"],
                                   ["actor_rollout_ref.model.mtp.loss_type=tv"]])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_no_operator_makes_more_than_one_chunk_of_logits(extra, dtype, small_chunks, monkeypatch):
    """The memory property: at most chunk_rows(V) = 5 rows of any [rows, V] tensor in the update's forward and
    backward (an fp32 chunk, its bf16 matmul output, the softmax buffer...), where the full-logits path makes
    [B*T, V] ones: B*T >= 30 rows here, so this fails on it (checked below)."""
    model = _model(tie_word_embeddings=True)
    batch = _batch(seed=3)
    cfg = _cfg("actor_rollout_ref.model.mtp.recursive_steps=3", f"actor_rollout_ref.model.dtype={dtype}", *extra)
    batch.ref_logprobs = torch.zeros(batch.input_ids.shape)
    widest = _widest_in_a_micro_batch(model, batch, cfg)
    assert mtprl.model.head.chunk_rows(V) == 5
    assert 0 < widest.rows <= 5, (widest.rows, widest.op)
    with monkeypatch.context() as m:  # the check catches the full-logits path
        m.setattr(update, "TokenScoring", functools.partial(TokenScoring, reference=True))
        full = _widest_in_a_micro_batch(model, batch, cfg)
    assert full.rows >= batch.input_ids.numel() - len(batch), (full.rows, full.op)


def test_sft_makes_no_more_than_one_chunk_of_logits(small_chunks):
    model = _model()
    examples = _sft_examples()
    cfg = _cfg("actor_rollout_ref.model.mtp.recursive_steps=2")
    with WidestVocabularyTensor(V) as widest:
        loss, _ = sft.sft_loss(model, examples, pad_id=0, num_targets=30, train_trunk=True, train_mtp=True, cfg=cfg)
        loss.backward()
    assert 0 < widest.rows <= 5, (widest.rows, widest.op)


def test_scoring_request_is_validated():
    with pytest.raises(ValueError, match="entropy"):
        TokenScoring(torch.ones(1, 2), entropy="maybe")
    assert dataclasses.replace(TokenScoring(torch.ones(1, 2)), reference=True).reference
