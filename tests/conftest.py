"""Shared fixtures: a tiny tokenizer + synthetic math data + random MiMo-style policy, built once per test session."""

from types import SimpleNamespace

import pytest

from mtprl.data import build_math_tokenizer, write_synthetic_math
from mtprl.model import ModelConfig
from mtprl.trainer.policy import init_policy_checkpoint


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_world")
    tok_dir = build_math_tokenizer(root / "tokenizer", vocab_size=320, num_problems=300, seed=0)
    data = write_synthetic_math(root / "data", num_train=64, num_val=16, seed=0, levels=(1,))
    model_dir = root / "policy"
    cfg = ModelConfig.tiny(vocab_size=320, hidden_size=32, intermediate_size=64, num_mtp_layers=2,
                           max_position_embeddings=512)
    init_policy_checkpoint(model_dir, cfg, tok_dir, seed=0)
    return SimpleNamespace(root=root, tokenizer=tok_dir, data=data, model=model_dir)
