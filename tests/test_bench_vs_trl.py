"""benchmarks/vs_trl.py's own arithmetic and config keys (the benchmark itself runs outside the suite: it needs
TRL, the `bench` extra, and half an hour)."""

import importlib.util
from pathlib import Path

import pytest
import torch

from mtprl.config import load_config
from mtprl.model import CausalLM, ModelConfig

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "vs_trl.py"
_spec = importlib.util.spec_from_file_location("bench_vs_trl", _PATH)
vs_trl = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(vs_trl)  # stdlib imports only at module level: no TRL needed


def test_matmul_params_by_hand():
    cfg = ModelConfig(model_type="qwen2", vocab_size=48, hidden_size=16, intermediate_size=40, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, attention_bias=True,
                      num_mtp_layers=1)
    model = CausalLM(cfg)
    dh = 16 // 4
    per_layer = 16 * 16 + 2 * 16 * (2 * dh) + 16 * 16 + 3 * 16 * 40  # q, k + v, o, gate + up + down
    # biases, norms, the embedding and the MTP layer are not matmul weights a trunk token goes through;
    # the tied head is counted once, as the output projection
    assert vs_trl.matmul_params(model) == 2 * per_layer + 48 * 16


def test_update_flops_by_hand():
    # one run, two steps (the first, a warm-up, is left out): 6 FLOPs per matmul weight and token, 3 x the
    # forward attention FLOPs per (query, key) pair for forward + backward (the model figure counts the causal half)
    steps = [{"update_actor": 99.0, "unique": 1, "real": 1, "sq_width": 1, "sq_real": 1},
             {"update_actor": 2.0, "unique": 10, "real": 30, "sq_width": 100, "sq_real": 60}]
    runs = [{"steps": steps, "mm_params": 1000, "attn_per_sq": 8, "matmul_gflops": 50.0}]
    out = vs_trl.update_flops(runs)
    assert out["executed_gflops"] == pytest.approx((6 * 1000 * 10 + 3 * 8 * 100) / 2.0 / 1e9)
    assert out["model_gflops"] == pytest.approx((6 * 1000 * 30 + 3 * 8 * 60 / 2) / 2.0 / 1e9)
    assert out["matmul_peak_gflops"] == 50.0


@pytest.mark.parametrize("config", ["off", "off_bf16", "on", "adaptive", "on_train"])
def test_our_settings_are_valid_config(config, tmp_path):
    paths = {"train": str(tmp_path / "train.parquet"), "demo": str(tmp_path / "m"), "25m": str(tmp_path / "m")}
    cfg = load_config(None, vs_trl.ours_overrides(paths, "demo", config))
    actor, mtp = cfg.actor_rollout_ref.actor, cfg.actor_rollout_ref.model.mtp
    assert (cfg.data.train_batch_size, cfg.actor_rollout_ref.rollout.n) == (vs_trl.PROMPTS, vs_trl.N)
    assert (actor.clip_ratio_low, actor.clip_ratio_high, actor.optim.lr) == (0.2, 0.28, 1e-5)
    assert not cfg.algorithm.filter_groups.enable and not actor.use_kl_loss
    assert mtp.enable_rollout == (not config.startswith("off")) and mtp.enable_train == (config == "on_train")
    assert cfg.actor_rollout_ref.model.dtype == ("bfloat16" if config == "off_bf16" else "float32")
    assert mtp.adaptive == (config == "adaptive")


def test_demo_sft_settings_pin_the_preset(tmp_path):
    data = type("Data", (), {"sft_train": str(tmp_path / "sft_train.parquet"), "sft_val": str(tmp_path / "v.parquet")})
    cfg = load_config("tiny_cpu", vs_trl.demo_sft_overrides(tmp_path, data, tmp_path / "init"))
    mtp, optim = cfg.actor_rollout_ref.model.mtp, cfg.actor_rollout_ref.actor.optim
    assert (cfg.data.train_batch_size, cfg.trainer.total_training_steps, cfg.data.max_response_length) == (64, 300, 48)
    assert (optim.lr, optim.warmup_style, optim.lr_warmup_steps, optim.min_lr_ratio) == (3e-3, "cosine", 20, 0.1)
    assert (mtp.mtp_loss_scaling_factor, mtp.recursive_steps, mtp.enable_train) == (1.0, 0, True)


def test_limits_model_is_confident_and_about_100m():
    torch.manual_seed(0)
    model = vs_trl.confident_lm()
    trunk = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("mtp_layers"))
    assert 90e6 < trunk < 110e6
    with torch.no_grad():
        ids = torch.randint(model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
        p = model(ids, compute_mtp=False).logits.softmax(-1)
    entropy = -(p * p.clamp_min(1e-30).log()).sum(-1).mean()
    assert entropy < 1.0  # a confident LM: the speculative limit measures acceptance, not noise
