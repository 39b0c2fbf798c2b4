import sys

import pytest

from mtprl.config import ConfigError, closest_key, from_dict, load_config, parse_override, preset_path, to_dict
from mtprl.config.loader import LEAF_TYPES, PRESET_DIR


def _error(overrides, preset=None) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(preset, overrides)
    return str(err.value)


# ------------------------------------------------------------------------------------ parsing
@pytest.mark.parametrize(
    "text,key,value,add",
    [
        ("actor_rollout_ref.actor.optim.lr=1e-6", "actor_rollout_ref.actor.optim.lr", 1e-6, False),
        ("a.b=0.", "a.b", 0.0, False),
        ("a.b=True", "a.b", True, False),
        ("a.b=null", "a.b", None, False),
        ("+a.b=4096", "a.b", 4096, True),
        ("++a.b=x", "a.b", "x", True),
        ("trainer.logger=['console','tensorboard']", "trainer.logger", ["console", "tensorboard"], False),
        ('trainer.logger=["console","wandb"]', "trainer.logger", ["console", "wandb"], False),
        ("data.train_files=/tmp/x=y.parquet", "data.train_files", "/tmp/x=y.parquet", False),
    ],
)
def test_parse_override(text, key, value, add):
    ov = parse_override(text)
    assert (ov.key, ov.value, ov.add) == (key, value, add)


@pytest.mark.parametrize("text", ["novalue", "=3", ".a=1", "a..b=1"])
def test_malformed_override(text):
    with pytest.raises(ConfigError, match="key=value|malformed"):
        parse_override(text)


# ------------------------------------------------------------------------------- unknown / types
def test_unknown_key_names_the_closest_valid_key_in_one_line():
    msg = _error(["actor_rollout_ref.actor.clip_ratio_hihg=0.3"])
    assert msg == (
        "unknown config key 'actor_rollout_ref.actor.clip_ratio_hihg' (command line); "
        "did you mean 'actor_rollout_ref.actor.clip_ratio_high'?"
    )


@pytest.mark.parametrize(
    "typo,meant",
    [
        ("trainer.total_epoch", "trainer.total_epochs"),
        ("actor_rollout_ref.model.mtp.enable_trian", "actor_rollout_ref.model.mtp.enable_train"),
        ("data.max_prompt_len", "data.max_prompt_length"),
        ("clip_ratio_high", "actor_rollout_ref.actor.clip_ratio_high"),  # a seed shell variable used as a key
        ("actor_rollout_ref.rollout.temprature", "actor_rollout_ref.rollout.temperature"),
    ],
)
def test_closest_key(typo, meant):
    assert closest_key(typo) == meant


def test_wrong_type_names_key_and_expected_type():
    assert _error(["data.train_batch_size=abc"]) == "data.train_batch_size: expected int, got 'abc' (command line)"
    assert "expected float" in _error(["actor_rollout_ref.actor.optim.lr=fast"])
    assert "expected bool" in _error(["actor_rollout_ref.model.mtp.enable=maybe"])
    assert "expected int or null" in _error(["trainer.total_training_steps=1.5"])


def test_plus_syntax():
    # + on a key the schema has is accepted (verl scripts write it for reward_kwargs)
    cfg = load_config(None, ["+reward_model.reward_kwargs.max_resp_len=100", "data.max_response_length=100"])
    assert cfg.reward_model.reward_kwargs.max_resp_len == 100
    # + adds new entries to open dicts; without + it is an error that says how to write it
    cfg = load_config(None, ["+actor_rollout_ref.model.override_config.attention_dropout=0."])
    assert cfg.actor_rollout_ref.model.override_config == {"attention_dropout": 0.0}
    assert "write it as +" in _error(["actor_rollout_ref.model.override_config.rope_theta=1"])
    # + does not invent keys outside open dicts
    assert "unknown config key" in _error(["+trainer.nonsense=1"])


def test_list_key_accepts_a_single_name():
    assert load_config(None, ["trainer.logger=tensorboard"]).trainer.logger == ["tensorboard"]


# -------------------------------------------------------------------------------- cross-field
@pytest.mark.parametrize(
    "overrides,words",
    [
        (["data.train_batch_size=6", "actor_rollout_ref.actor.ppo_mini_batch_size=4"], "must divide data.train_batch_size"),
        (["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=3"], "must divide the mini-batch"),
        (["actor_rollout_ref.actor.clip_ratio_c=1.0"], "clip_ratio_c=1.0 must be > 1"),
        (["reward_model.reward_manager=dapo", "+reward_model.reward_kwargs.overlong_buffer_cfg.enable=True",
          "+reward_model.reward_kwargs.overlong_buffer_cfg.len=600"], "must be <= reward_model.reward_kwargs.max_resp_len=512"),
        (["data.max_response_length=0"], "data.max_response_length=0 must be > 0"),
        (["data.max_prompt_length=-3"], "data.max_prompt_length=-3 must be > 0"),
        (["actor_rollout_ref.model.mtp.enable=True", "actor_rollout_ref.model.mtp.speculative_eagle_topk=1"],
         "must equal speculative_num_steps + 1 = 3"),
        (["actor_rollout_ref.model.mtp.enable=True", "actor_rollout_ref.model.mtp.speculative_num_draft_tokens=8"],
         "must lie in [3, 7]"),
        (["actor_rollout_ref.model.mtp.enable_rollout=True"], "need actor_rollout_ref.model.mtp.enable=True"),
        (["actor_rollout_ref.actor.loss_agg_mode=seq-mean-tok-mean"], "did you mean 'seq-mean-token-mean'"),
        (["algorithm.adv_estimator=gpro"], "did you mean 'grpo'"),
        (["trainer.logger=[console,swanlab]"],
         "trainer.logger='swanlab' is not one of console, jsonl, tensorboard, wandb, mlflow"),
        (["trainer.nnodes=2", "data.train_batch_size=3"], "must be a multiple of the 2 ranks"),
        (["trainer.collective_timeout_s=0"], "collective_timeout_s=0.0 must be > 0"),
        (["trainer.nnodes=2", "algorithm.filter_groups.enable=True", "algorithm.filter_groups.metric=seq_final_reward",
          "algorithm.use_kl_in_reward=True", "data.gen_batch_size=4", "data.train_batch_size=4"],
         "not available with more than one rank"),
        (["actor_rollout_ref.actor.ulysses_sequence_parallel_size=2"], "parallelism needs a back-end"),
        (["actor_rollout_ref.actor.fsdp_config.param_offload=True", "trainer.device=cuda"], "needs FSDP"),
        (["actor_rollout_ref.actor.grad_clip=0.5", "actor_rollout_ref.actor.optim.clip_grad=2.0"], "disagree"),
        (["trainer.save_freq=0"], "positive number of steps or -1"),
        (["actor_rollout_ref.actor.fsdp_config.fsdp_size=4"], "hybrid sharding is not built"),
        (["algorithm.lam=0.95"], "needs a critic"),
        (["data.gen_batch_size=16"], "only applies with dynamic sampling"),
        (["actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=-1"],
         "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=-1 must be > 0"),
        (["actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=0"],
         "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=0 must be > 0"),
        (["actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu=0"], "log_prob_max_token_len_per_gpu=0 must be > 0"),
        (["actor_rollout_ref.rollout.val_kwargs.n=0"], "actor_rollout_ref.rollout.val_kwargs.n=0 must be > 0"),
        (["actor_rollout_ref.actor.loss_scale_factor=0"], "loss_scale_factor=0 must be > 0"),
        (["sft.micro_batch_size_per_gpu=-2"], "sft.micro_batch_size_per_gpu=-2 must be > 0"),
        (["trainer.resume_from_path=/ckpt/global_step_5"], "set trainer.resume_mode=resume_path"),
        (["trainer.max_actor_ckpt_to_keep=-1"], "max_actor_ckpt_to_keep=-1 must be >= 1"),
        (["trainer.log_val_generations=-1"], "log_val_generations=-1 must be >= 0"),
        (["algorithm.kl_ctrl.type=adaptive", "algorithm.kl_ctrl.horizon=0"], "horizon=0 must be > 0"),
        (["actor_rollout_ref.model.mtp.enable=True", "actor_rollout_ref.model.mtp.enable_train=True",
          "actor_rollout_ref.model.mtp.lr=0"], "actor_rollout_ref.model.mtp.lr=0.0 must be > 0"),
        (["actor_rollout_ref.model.mtp.enable=True", "actor_rollout_ref.model.mtp.lr=1e-3"],
         "is set but the MTP layers are not trained"),
    ],
)
def test_cross_field_errors(overrides, words):
    assert words in _error(overrides)


def test_every_problem_is_reported_one_per_line():
    msg = _error(["actor_rollout_ref.actor.clip_ratio_c=0.5", "data.max_response_length=0", "algorithm.adv_estimator=x"])
    assert len(msg.splitlines()) == 3


def test_verl_aliases_resolve():
    cfg = load_config(None, ["actor_rollout_ref.actor.clip_ratio=0.1"])
    assert (cfg.actor_rollout_ref.actor.clip_ratio_low, cfg.actor_rollout_ref.actor.clip_ratio_high) == (0.1, 0.1)
    cfg = load_config(None, ["actor_rollout_ref.actor.clip_ratio=0.1", "actor_rollout_ref.actor.clip_ratio_high=0.3"])
    assert (cfg.actor_rollout_ref.actor.clip_ratio_low, cfg.actor_rollout_ref.actor.clip_ratio_high) == (0.1, 0.3)
    assert load_config(None, ["actor_rollout_ref.actor.grad_clip=0.5"]).actor_rollout_ref.actor.optim.clip_grad == 0.5
    cfg = load_config(None, ["data.train_files=/a.parquet", "data.max_response_length=64"])
    assert cfg.data.train_files == ["/a.parquet"]
    assert cfg.reward_model.reward_kwargs.max_resp_len == 64
    assert cfg.data.gen_batch_size == cfg.data.train_batch_size


def test_interpolated_default_dir():
    cfg = load_config(None, ["trainer.project_name=p", "trainer.experiment_name=e"])
    assert cfg.trainer.default_local_dir == "checkpoints/p/e"


# ------------------------------------------------------------------------------------ presets
@pytest.mark.parametrize("preset", sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
def test_every_preset_is_valid(preset):
    cfg = load_config(preset)
    assert from_dict(to_dict(cfg)) == cfg  # and survives a save/restore round trip


def test_preset_by_path_and_errors(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("data:\n  train_batch_size: 32\nactor_rollout_ref:\n  actor:\n    ppo_mini_batch_size: 8\n")
    assert load_config(str(p)).data.train_batch_size == 32
    assert "did you mean 'tiny_cpu'" in _error([], preset="tiny_cpx")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  train_batch_sise: 32\n")
    assert _error([], preset=str(bad)) == (
        "unknown config key 'data.train_batch_sise' (preset bad.yaml); did you mean 'data.train_batch_size'?"
    )
    assert preset_path("tiny_cpu").name == "tiny_cpu.yaml"


def test_schema_has_the_mtp_block_of_the_spec():
    for name in ("enable", "enable_train", "enable_rollout", "mtp_loss_scaling_factor", "detach_encoder",
                 "speculative_algorithm", "speculative_num_steps", "speculative_eagle_topk", "speculative_num_draft_tokens"):
        assert f"actor_rollout_ref.model.mtp.{name}" in LEAF_TYPES
    cfg = load_config()
    mtp = cfg.actor_rollout_ref.model.mtp
    assert (mtp.mtp_loss_scaling_factor, mtp.speculative_num_steps, mtp.speculative_eagle_topk,
            mtp.speculative_num_draft_tokens) == (0.1, 2, 2, 4)


@pytest.mark.parametrize("name", ["wandb", "mlflow"])
def test_remote_logger_needs_its_package_and_names_the_extra(name, monkeypatch):
    assert load_config(None, [f"trainer.logger=[console,{name}]"]).trainer.logger == ["console", name]  # installed
    monkeypatch.setitem(sys.modules, name, None)  # as if not installed: find_spec -> None, import -> ImportError
    with pytest.raises(ConfigError, match=rf"trainer.logger includes '{name}' but the {name} package is not "
                                          rf"installed: pip install 'mtprl\[{name}\]'"):
        load_config(None, [f"trainer.logger=[console,{name}]"])


def test_a_registered_estimator_loss_mode_and_kl_kind_validate(monkeypatch):
    """Validation reads the algorithm registries, so what a user registers (as the README invites) is accepted;
    a typo still names the closest registered name."""
    from mtprl.algorithms import ADV_ESTIMATORS, KL_PENALTIES, LOSS_AGG_MODES

    with pytest.raises(ConfigError, match=r"algorithm.adv_estimator='my_est'.*grpo"):
        load_config(None, ["algorithm.adv_estimator=my_est"])
    for registry, name in ((ADV_ESTIMATORS, "my_est"), (LOSS_AGG_MODES, "my-mean"), (KL_PENALTIES, "my_kl")):
        monkeypatch.setitem(registry._entries, name, lambda *a, **k: None)
    cfg = load_config(None, ["algorithm.adv_estimator=my_est", "actor_rollout_ref.actor.loss_agg_mode=my-mean",
                             "actor_rollout_ref.actor.kl_loss_type=my_kl", "algorithm.kl_penalty=my_kl"])
    assert cfg.algorithm.adv_estimator == "my_est" and cfg.actor_rollout_ref.actor.loss_agg_mode == "my-mean"
    with pytest.raises(ConfigError, match=r"did you mean 'my_est'"):
        load_config(None, ["algorithm.adv_estimator=my_esx"])
