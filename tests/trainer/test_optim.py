"""The LR schedule against verl's get_constant_schedule_with_warmup / get_cosine_schedule_with_warmup; the optimizer's
parameter groups (the MTP layers' own lr)."""

import math

import pytest
import torch

from mtprl.config.schema import OptimConfig
from mtprl.trainer.optim import build_optimizer, build_scheduler, lr_factor


def test_constant_warmup_starts_from_zero_as_verl():
    # verl: current_step / max(1, num_warmup_steps) while current_step < num_warmup_steps, then 1
    got = [lr_factor(s, warmup=4, total=10, style="constant", min_lr_ratio=0.0) for s in range(6)]
    assert got == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 1.0])


def test_cosine_warmup_then_decay_to_min_ratio():
    f = [lr_factor(s, warmup=2, total=6, style="cosine", min_lr_ratio=0.1) for s in range(7)]
    # warmup 0, 1/2; then 0.1 + 0.9 * 0.5 * (1 + cos(pi * (s - 2) / 4))
    expect = [0.0, 0.5] + [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 4)) for s in range(2, 7)]
    assert f == pytest.approx(expect)
    assert f[2] == pytest.approx(1.0) and f[4] == pytest.approx(0.55) and f[6] == pytest.approx(0.1)


def test_scheduler_lr_per_step():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1e-3)
    sched = build_scheduler(opt, OptimConfig(lr=1e-3, lr_warmup_steps=2), total_steps=5)
    lrs = []
    for _ in range(4):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.0, 0.5e-3, 1e-3, 1e-3])


def _mtp_model():
    from mtprl.model import CausalLM, ModelConfig

    torch.manual_seed(0)
    return CausalLM(ModelConfig(model_type="mimo", vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=1, num_mtp_layers=1,
                                tie_word_embeddings=True))


def test_mtp_lr_puts_the_mtp_layers_in_groups_of_their_own():
    model = _mtp_model()
    opt = build_optimizer(model, OptimConfig(lr=1e-5, weight_decay=0.1), mtp_lr=1e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [[names[id(p)] for p in g["params"]] for g in opt.param_groups]
    assert [g["lr"] for g in opt.param_groups] == [1e-5, 1e-5, 1e-3, 1e-3]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0, 0.1, 0.0]
    assert all(not n.startswith("mtp_layers.") for g in groups[:2] for n in g)
    assert all(n.startswith("mtp_layers.") for g in groups[2:] for n in g)
    assert sorted(n for g in groups for n in g) == sorted(names.values())  # every parameter exactly once
    assert "mtp_layers.0.input_proj.weight" in groups[2] and "mtp_layers.0.final_layernorm.weight" in groups[3]
    # without it: the two groups as before (checkpoints of earlier runs resume)
    assert [g["lr"] for g in build_optimizer(model, OptimConfig(lr=1e-5)).param_groups] == [1e-5, 1e-5]


def test_the_schedule_scales_the_mtp_lr_as_the_actors():
    model = _mtp_model()
    opt = build_optimizer(model, OptimConfig(lr=1e-5), mtp_lr=1e-3)
    sched = build_scheduler(opt, OptimConfig(lr=1e-5, lr_warmup_steps=2), total_steps=5)
    seen = []
    for _ in range(3):
        seen.append(sched.get_last_lr())
        opt.step()
        sched.step()
    assert [s[0] for s in seen] == pytest.approx([0.0, 0.5e-5, 1e-5])
    assert [s[2] for s in seen] == pytest.approx([0.0, 0.5e-3, 1e-3])


def test_one_adam_step_moves_the_mtp_layers_by_their_own_lr():
    # Adam's first step moves every parameter by ~lr * sign(grad): the MTP weights move 100x the trunk's
    model = _mtp_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, OptimConfig(lr=1e-5, weight_decay=0.0), mtp_lr=1e-3)
    out = model(torch.randint(0, 32, (2, 6)))
    (out.logits.square().mean() + out.mtp_logits[0].square().mean()).backward()
    opt.step()
    moved = {n: float((p.detach() - before[n]).abs().max()) for n, p in model.named_parameters()}
    assert moved["mtp_layers.0.input_proj.weight"] == pytest.approx(1e-3, rel=1e-3)
    assert moved["layers.0.mlp.up_proj.weight"] == pytest.approx(1e-5, rel=1e-3)


def test_pending_state_bytes_counts_the_moments_not_yet_allocated():
    """AdamW's two fp32 moments per parameter, allocated at its first step: 8 B x numel for each parameter without
    state on a device, nothing for one that has state or lives on the host (CPU offload)."""
    from mtprl.trainer.optim import pending_state_bytes

    device_params = [torch.nn.Parameter(torch.empty(3, 5, device="meta")), torch.nn.Parameter(torch.empty(7, device="meta"))]
    host = torch.nn.Parameter(torch.zeros(11))
    optimizer = torch.optim.AdamW(device_params + [host])
    assert pending_state_bytes(optimizer) == 8 * (15 + 7)
    optimizer.state[device_params[0]] = {"step": torch.tensor(1.0)}
    assert pending_state_bytes(optimizer) == 8 * 7
