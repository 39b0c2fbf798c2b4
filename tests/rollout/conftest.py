"""Tiny models for the rollout tests.

`draftable_model` builds a random tiny MiMo-style model whose MTP layers are PARTLY right: the trunk is close
to a bigram model (its blocks' output projections are scaled down, so the next token depends mostly on the
current token, a little on the context) and each MTP layer's input projection is set to pass the token
embedding through (plus noise), so depth k predicts roughly "the trunk's next token after t_{i+k}". Drafts
are then accepted often but not always, giving ragged acceptance across a batch.
"""

from __future__ import annotations

import pytest
import torch

from mtprl.model import CausalLM, tiny_config


def make_draftable_model(*, vocab: int = 16, num_mtp_layers: int = 1, noise: float = 0.3, context: float = 0.3,
                         logit_scale: float = 25.0, seed: int = 0, num_layers: int = 2) -> CausalLM:
    torch.manual_seed(seed)
    cfg = tiny_config(vocab_size=vocab, num_mtp_layers=num_mtp_layers, num_hidden_layers=num_layers)
    model = CausalLM(cfg).eval()
    h = cfg.hidden_size
    with torch.no_grad():
        model.embed_tokens.weight.normal_(0.0, 1.0)
        model.lm_head.weight.mul_(logit_scale)
        blocks = [layer for layer in model.layers] + [m.block for m in model.mtp_layers]
        for block in blocks:
            block.self_attn.o_proj.weight.mul_(context / 0.02 * 0.05)
            block.mlp.down_proj.weight.mul_(context)
        for m in model.mtp_layers:
            w = torch.zeros(h, 2 * h)
            w[:, h:] = torch.eye(h)
            m.input_proj.weight.copy_(w + noise * torch.randn(h, 2 * h) / h ** 0.5)
    return model


@pytest.fixture
def draftable_model():
    return make_draftable_model


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models on a shared 2-core machine: OpenMP threads spinning against other processes make these tests
    10-50x slower, so run them single-threaded (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
