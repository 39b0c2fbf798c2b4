"""actor_rollout_ref.model.dtype=bfloat16 on one process: fp32 master weights and optimizer state, the forwards
and backwards under bf16 autocast, log-softmax and losses in fp32 (mtprl.trainer.policy).

Tolerances. bf16 keeps 8 significant bits: its unit roundoff is u = 2^-8 ~ 0.0039. Autocast rounds each
matmul's inputs to bf16 (the products accumulate in fp32), so each layer adds O(u) relative error and the
tiny model's 2 trunk + 2 MTP layers O(a few u). Measured on this model and batch: the loss and its metrics
agree to ~1e-4 relative, the whole gradient to 0.4% (~u), the worst single tensor (a 16-element k_proj bias,
whose entries partly cancel) to 2.1%, the log-probs to 0.0014 absolute. The bounds are u for the losses,
2u for the whole gradient, 8u for any one tensor and 0.01 for the log-probs: a few times what bf16 rounding
gives, far below what a wrong cast (a bf16 log-softmax, bf16 master weights) or a missing term would give.
"""


import pytest
import torch

from mtprl.config import ConfigError, load_config
from mtprl.model import CausalLM, ModelConfig
from mtprl.trainer.optim import build_optimizer
from mtprl.trainer.policy import check_precision, load_policy
from mtprl.trainer.update import actor_update, compute_logprobs

from tests.trainer.updates import sgd_delta, train_batch, update_cfg

U = 2.0 ** -8  # bf16 unit roundoff
BF16 = "actor_rollout_ref.model.dtype=bfloat16"


def _model():
    torch.manual_seed(0)
    return CausalLM(ModelConfig.tiny(vocab_size=64))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def test_bf16_update_is_close_to_fp32_and_really_runs_in_bf16():
    model, batch = _model(), train_batch()
    batch.old_logprobs = compute_logprobs(model, batch, update_cfg()) + 0.05 * batch.response_mask  # ratios != 1
    g32, m32, _ = sgd_delta(model, batch, update_cfg())
    g16, m16, _ = sgd_delta(model, batch, update_cfg(BF16))
    flat32 = torch.cat([g.flatten() for g in g32.values()])
    flat16 = torch.cat([g16[k].flatten() for k in g32])
    assert _rel(flat16, flat32) < 2 * U
    assert not torch.equal(flat16, flat32)  # autocast did something: this is not a silent fp32 run
    for k, g in g32.items():
        assert g16[k].dtype == torch.float32
        if g.norm() > 0:
            assert _rel(g16[k], g) < 8 * U, k
    for k in ("actor/pg_loss", "actor/entropy", "actor/ppo_kl", "mtp_losses/mtp_1_loss", "mtp_losses/mtp_2_loss",
              "actor/grad_norm"):
        assert m16[k] == pytest.approx(m32[k], rel=U), k


def test_bf16_logprobs_are_fp32_and_close():
    model, batch = _model(), train_batch()
    lp32 = compute_logprobs(model, batch, update_cfg())
    lp16 = compute_logprobs(model, batch, update_cfg(BF16))
    assert lp16.dtype == torch.float32
    torch.testing.assert_close(lp16, lp32, rtol=0, atol=0.01)
    assert not torch.equal(lp16, lp32)


def test_bf16_logits_inside_fp32_outside():
    """Under the update's context the head's matmul runs in bf16, while the weights stay fp32."""
    from mtprl.trainer.policy import compute_autocast

    model, batch = _model(), train_batch()
    cfg = update_cfg(BF16)
    with compute_autocast(cfg.actor_rollout_ref.model, torch.device("cpu")):
        out = model(batch.input_ids, attention_mask=batch.attention_mask)
    assert out.logits.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_master_weights_and_optimizer_state_stay_fp32_and_small_steps_are_kept():
    """AdamW on fp32 master weights: its state is fp32 and a step far below bf16's resolution of a weight still
    changes that weight (bf16 weights would round it away)."""
    model, batch = _model(), train_batch()
    cfg = update_cfg(BF16, "actor_rollout_ref.actor.optim.lr=1e-5")
    opt = build_optimizer(model, cfg.actor_rollout_ref.actor.optim)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    metrics, skipped = actor_update(model, opt, batch, cfg, torch.Generator().manual_seed(0))
    assert skipped == 0
    assert all(p.dtype == torch.float32 for p in model.parameters())
    states = [s for s in opt.state.values() if s]
    assert states and all(v.dtype == torch.float32 for s in states for k, v in s.items() if k != "step")
    w = model.get_parameter("layers.0.mlp.up_proj.weight").detach()
    delta = (w - before["layers.0.mlp.up_proj.weight"]).abs()
    below_bf16 = (delta > 0) & (delta < w.abs() * U)  # each a change bf16 storage could not hold
    assert below_bf16.float().mean() > 0.5


def test_unsupported_precisions_are_errors_not_fp32(tmp_path):
    with pytest.raises(ConfigError, match="float16 is not supported.*loss scaling"):
        load_config(None, ["actor_rollout_ref.model.dtype=float16"])
    cfg = load_config(None, [BF16])
    with pytest.raises(ConfigError, match="no autocast for device 'meta'"):
        check_precision(cfg.actor_rollout_ref.model, torch.device("meta"))
    check_precision(cfg.actor_rollout_ref.model, torch.device("cpu"))


def test_bf16_policy_loads_fp32_weights(tmp_path):
    model = CausalLM(ModelConfig.tiny(vocab_size=64))
    model.save_pretrained(str(tmp_path / "ckpt"))
    cfg = load_config(None, [BF16, f"actor_rollout_ref.model.path={tmp_path / 'ckpt'}"])
    loaded = load_policy(cfg.actor_rollout_ref.model, torch.device("cpu"))
    assert all(p.dtype == torch.float32 for p in loaded.parameters())


@pytest.mark.slow
def test_two_bf16_dapo_steps_end_to_end(tiny_world, tmp_path):
    """A run with the key set trains (MTP trained and speculating), logs, and saves fp32 weights."""
    from mtprl.model import from_pretrained
    from mtprl.trainer.loop import train
    from tests.trainer.test_loop import _cfg as loop_cfg, _rows

    out = tmp_path / "bf16"
    train(loop_cfg(tiny_world, out, "trainer.total_training_steps=2", "trainer.val_before_train=False", BF16))
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        for key in ("actor/pg_loss", "actor/grad_norm", "mtp_losses/mtp_1_loss", "rollout/spec_accept_length"):
            assert key in r and r[key] == r[key], key  # present and not NaN
    saved = from_pretrained(out / "global_step_2" / "actor")
    assert all(p.dtype == torch.float32 for p in saved.parameters())
    before = from_pretrained(tiny_world.model).state_dict()
    assert not torch.equal(before["layers.0.mlp.up_proj.weight"], saved.state_dict()["layers.0.mlp.up_proj.weight"])
