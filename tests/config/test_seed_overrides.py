"""Every override the seed README shows (configuration sections 1-8, examples 1-4, FAQ), typed the
way a verl user types it, with the seed's shell variables expanded to the values it gives.

Each one must either land in the resolved config or be rejected by validation with a reason.
Model and data paths are swapped for local tiny ones.
"""

from pathlib import Path

import pytest

from mtprl.config import ConfigError, load_config, to_dict

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
PATHS = [
    f"data.train_files={FIXTURES / 'dapo_math_17k_layout_sample.parquet'}",
    f"data.val_files={FIXTURES / 'aime_2024_layout_sample.parquet'}",
    "actor_rollout_ref.model.path=/tmp/tiny-mimo",
]

# (override as typed, dotted key it sets, expected resolved value)
LANDS = [
    # 1. MTP
    ("actor_rollout_ref.model.mtp.enable=True", "actor_rollout_ref.model.mtp.enable", True),
    ("actor_rollout_ref.model.mtp.enable_train=True", "actor_rollout_ref.model.mtp.enable_train", True),
    ("actor_rollout_ref.model.mtp.mtp_loss_scaling_factor=0.1", "actor_rollout_ref.model.mtp.mtp_loss_scaling_factor", 0.1),
    ("actor_rollout_ref.model.mtp.detach_encoder=True", "actor_rollout_ref.model.mtp.detach_encoder", True),
    # 2. DAPO algorithm (adv_estimator, use_kl_in_reward, kl_coef, use_kl_loss, kl_loss_coef, clip ratios)
    ("algorithm.adv_estimator=grpo", "algorithm.adv_estimator", "grpo"),
    ("algorithm.use_kl_in_reward=False", "algorithm.use_kl_in_reward", False),
    ("algorithm.kl_ctrl.kl_coef=0.0", "algorithm.kl_ctrl.kl_coef", 0.0),
    ("actor_rollout_ref.actor.use_kl_loss=False", "actor_rollout_ref.actor.use_kl_loss", False),
    ("actor_rollout_ref.actor.kl_loss_coef=0.0", "actor_rollout_ref.actor.kl_loss_coef", 0.0),
    ("actor_rollout_ref.actor.clip_ratio_low=0.2", "actor_rollout_ref.actor.clip_ratio_low", 0.2),
    ("actor_rollout_ref.actor.clip_ratio_high=0.28", "actor_rollout_ref.actor.clip_ratio_high", 0.28),
    # 3. lengths ($((1024 * 2)), $((1024 * 8)) expanded by the shell)
    ("data.max_prompt_length=2048", "data.max_prompt_length", 2048),
    ("data.max_response_length=8192", "data.max_response_length", 8192),
    # 4. batches
    ("data.train_batch_size=128", "data.train_batch_size", 128),
    ("actor_rollout_ref.rollout.n=16", "actor_rollout_ref.rollout.n", 16),
    ("actor_rollout_ref.actor.ppo_mini_batch_size=32", "actor_rollout_ref.actor.ppo_mini_batch_size", 32),
    # 5. parallelism that we do have (pp=1, cp=1 of example 2 are the defaults)
    ("actor_rollout_ref.actor.megatron.pipeline_model_parallel_size=1",
     "actor_rollout_ref.actor.megatron.pipeline_model_parallel_size", 1),
    ("actor_rollout_ref.actor.megatron.context_parallel_size=1", "actor_rollout_ref.actor.megatron.context_parallel_size", 1),
    # 6. rollout engine settings
    ("actor_rollout_ref.rollout.enable_chunked_prefill=True", "actor_rollout_ref.rollout.enable_chunked_prefill", True),
    ("actor_rollout_ref.rollout.gpu_memory_utilization=0.80", "actor_rollout_ref.rollout.gpu_memory_utilization", 0.8),
    # 7. DAPO reward
    ("reward_model.reward_manager=dapo", "reward_model.reward_manager", "dapo"),
    ("+reward_model.reward_kwargs.overlong_buffer_cfg.enable=True", "reward_model.reward_kwargs.overlong_buffer_cfg.enable", True),
    ("+reward_model.reward_kwargs.overlong_buffer_cfg.len=4096", "reward_model.reward_kwargs.overlong_buffer_cfg.len", 4096),
    ("+reward_model.reward_kwargs.overlong_buffer_cfg.penalty_factor=1.0",
     "reward_model.reward_kwargs.overlong_buffer_cfg.penalty_factor", 1.0),
    ("+reward_model.reward_kwargs.max_resp_len=8192", "reward_model.reward_kwargs.max_resp_len", 8192),
    # 8. trainer
    ("trainer.total_epochs=10", "trainer.total_epochs", 10),
    ("trainer.total_training_steps=400", "trainer.total_training_steps", 400),
    ("trainer.test_freq=10", "trainer.test_freq", 10),
    ("trainer.save_freq=-1", "trainer.save_freq", -1),
    ("trainer.val_before_train=False", "trainer.val_before_train", False),
    ("trainer.log_val_generations=10", "trainer.log_val_generations", 10),
    # example 3: MTP weights
    ("actor_rollout_ref.model.mtp.mtp_loss_scaling_factor=0.2", "actor_rollout_ref.model.mtp.mtp_loss_scaling_factor", 0.2),
    ("actor_rollout_ref.model.mtp.detach_encoder=False", "actor_rollout_ref.model.mtp.detach_encoder", False),
    # example 4: MTP in rollout (EAGLE settings)
    ("actor_rollout_ref.model.mtp.enable_rollout=True", "actor_rollout_ref.model.mtp.enable_rollout", True),
    ("actor_rollout_ref.model.mtp.speculative_algorithm=EAGLE", "actor_rollout_ref.model.mtp.speculative_algorithm", "EAGLE"),
    ("actor_rollout_ref.model.mtp.speculative_num_steps=2", "actor_rollout_ref.model.mtp.speculative_num_steps", 2),
    ("actor_rollout_ref.model.mtp.speculative_eagle_topk=2", "actor_rollout_ref.model.mtp.speculative_eagle_topk", 2),
    ("actor_rollout_ref.model.mtp.speculative_num_draft_tokens=4", "actor_rollout_ref.model.mtp.speculative_num_draft_tokens", 4),
    # FAQ 1, 2, 5, 8 and the performance notes
    ("actor_rollout_ref.actor.optim.clip_grad=1.0", "actor_rollout_ref.actor.optim.clip_grad", 1.0),
    ("trainer.logger=[\"console\",\"tensorboard\"]", "trainer.logger", ["console", "tensorboard"]),
    ("actor_rollout_ref.rollout.prometheus.enable=True", "actor_rollout_ref.rollout.prometheus.enable", True),
    ("actor_rollout_ref.rollout.prometheus.port=44398", "actor_rollout_ref.rollout.prometheus.port", 44398),
    ("actor_rollout_ref.actor.use_dynamic_bsz=True", "actor_rollout_ref.actor.use_dynamic_bsz", True),
]

# The seed's settings for back-ends mtprl does not have: (override, words the error must contain)
REJECTED = [
    ("actor_rollout_ref.rollout.name=sglang", "not available"),  # section 6
    ("actor_rollout_ref.rollout.tensor_model_parallel_size=4", "not available"),  # gen_tp=4
    ("actor_rollout_ref.rollout.tensor_model_parallel_size=8", "not available"),  # example 2: gen_tp=8
    ("actor_rollout_ref.actor.megatron.tensor_model_parallel_size=2", "Megatron"),  # train_tp=2
    ("actor_rollout_ref.actor.megatron.tensor_model_parallel_size=4", "Megatron"),  # example 2: train_tp=4
    ("actor_rollout_ref.actor.megatron.pipeline_model_parallel_size=2", "pipeline parallelism"),  # train_pp=2
    ("actor_rollout_ref.actor.megatron.context_parallel_size=2", "context parallelism"),  # train_cp=2
    ("actor_rollout_ref.actor.megatron.param_offload=True", "offload"),  # offload=True
    ("actor_rollout_ref.actor.megatron.optimizer_offload=True", "offload"),
    ("actor_rollout_ref.actor.megatron.grad_offload=True", "offload"),
    ("actor_rollout_ref.ref.megatron.param_offload=True", "offload"),
    ("actor_rollout_ref.actor.megatron.use_mbridge=True", "mbridge"),  # performance notes
    ("actor_rollout_ref.actor.strategy=megatron", "Megatron"),
]

# FAQ 5 (out of memory) variants, applied on top of the seed command: all land.
FAQ_MEMORY = [
    ("data.train_batch_size=64", "data.train_batch_size", 64),
    ("actor_rollout_ref.actor.ppo_mini_batch_size=16", "actor_rollout_ref.actor.ppo_mini_batch_size", 16),
    ("data.max_response_length=6144", "data.max_response_length", 6144),
    ("actor_rollout_ref.rollout.gpu_memory_utilization=0.70", "actor_rollout_ref.rollout.gpu_memory_utilization", 0.7),
]


def _get(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def _seed_command() -> list[str]:
    # The seed's example-1 command line: every landing override, later ones winning (as in a shell).
    return PATHS + [o for o, _, _ in LANDS]


def test_seed_command_lands_every_override():
    cfg = to_dict(load_config(None, _seed_command()))
    final = {}
    for override, key, value in LANDS:
        final[key] = value  # later overrides of the same key win
    for key, value in final.items():
        got = _get(cfg, key)
        assert got == pytest.approx(value) if isinstance(value, float) else got == value, key


@pytest.mark.parametrize("override,key,value", FAQ_MEMORY)
def test_faq_memory_overrides_land(override, key, value):
    cfg = to_dict(load_config(None, _seed_command() + [override]))
    assert _get(cfg, key) == pytest.approx(value)


@pytest.mark.parametrize("override,words", REJECTED)
def test_unavailable_backends_are_rejected_with_a_reason(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, _seed_command() + [override])
    message = str(err.value)
    key = override.split("=", 1)[0].lstrip("+")
    line = next((ln for ln in message.splitlines() if key.rsplit(".", 1)[-1] in ln), "")
    assert words in line, message
    assert len(message.splitlines()) == 1  # only the rejected key is wrong


def test_seed_dapo_preset_is_the_seed_recipe():
    cfg = load_config("dapo_mimo_7b", PATHS)
    assert cfg.actor_rollout_ref.model.mtp.enable_train and cfg.actor_rollout_ref.model.mtp.enable_rollout
    assert (cfg.data.max_prompt_length, cfg.data.max_response_length) == (2048, 8192)
    assert (cfg.data.train_batch_size, cfg.actor_rollout_ref.rollout.n) == (128, 16)
    assert cfg.reward_model.reward_kwargs.overlong_buffer_cfg.len == 4096
