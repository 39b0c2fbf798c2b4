"""Resolution of derived values and cross-field validation of an :class:`MtprlConfig`.

``resolve`` fills values that default to another key (``gen_batch_size`` -> ``train_batch_size``)
and maps verl's alias spellings onto the canonical keys. ``validate_config`` collects every problem
and raises one :class:`ConfigError` with one line per problem, each naming the key, what is wrong
and what to do instead.
"""

from __future__ import annotations

import difflib
import importlib.util
from typing import Iterable

from mtprl.config.loader import ConfigError
from mtprl.config.schema import MegatronConfig, MtprlConfig

TRUNCATIONS = ("error", "left", "right", "middle")
LOGGERS = ("console", "jsonl", "tensorboard", "wandb", "mlflow")
REWARD_MANAGERS = ("naive", "dapo")
MTP_LOSS_TYPES = ("ce", "kl", "tv")
MTP_DRAFT_ALGORITHMS = ("EAGLE", "MTP", "NEXTN")
FILTER_METRICS = ("acc", "score", "seq_reward", "seq_final_reward")
DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("cpu", "cuda", "auto")
UNAVAILABLE_ROLLOUTS = {
    "sglang": "SGLang",
    "hf": "the transformers generate loop",
}
ROLLOUTS = ("native", "vllm")


def resolve(cfg: MtprlConfig, explicitly_set: Iterable[str] = ()) -> None:
    """Fill derived values in place (aliases, values that default to other keys)."""
    explicit = set(explicitly_set)
    data, actor = cfg.data, cfg.actor_rollout_ref.actor
    for name in ("train_files", "val_files"):
        files = getattr(data, name)
        setattr(data, name, [files] if isinstance(files, str) else list(files or []))
    if data.gen_batch_size is None:
        data.gen_batch_size = data.train_batch_size
    if actor.clip_ratio is not None:
        pre = "actor_rollout_ref.actor."
        if pre + "clip_ratio_low" not in explicit:
            actor.clip_ratio_low = actor.clip_ratio
        if pre + "clip_ratio_high" not in explicit:
            actor.clip_ratio_high = actor.clip_ratio
    if actor.grad_clip is not None:
        if "actor_rollout_ref.actor.optim.clip_grad" in explicit and actor.optim.clip_grad != actor.grad_clip:
            raise ConfigError(
                f"actor_rollout_ref.actor.grad_clip={actor.grad_clip} and actor_rollout_ref.actor.optim.clip_grad="
                f"{actor.optim.clip_grad} disagree; they are two spellings of one setting, set one"
            )
        actor.optim.clip_grad = actor.grad_clip
    kwargs = cfg.reward_model.reward_kwargs
    if kwargs.max_resp_len is None:
        kwargs.max_resp_len = data.max_response_length
    if cfg.actor_rollout_ref.model.tokenizer_path is None and data.tokenizer is not None:
        cfg.actor_rollout_ref.model.tokenizer_path = data.tokenizer


def _choice(errors: list[str], key: str, value: str, allowed: Iterable[str], why: str = "") -> None:
    allowed = tuple(allowed)
    if value in allowed:
        return
    guess = difflib.get_close_matches(str(value), allowed, n=1)
    hint = f"; did you mean '{guess[0]}'?" if guess else ""
    errors.append(f"{key}={value!r} is not one of {', '.join(allowed)}{why}{hint}")


def _positive(errors: list[str], key: str, value: float | int | None, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value <= 0:
        errors.append(f"{key}={value} must be > 0")


def _check_megatron(errors: list[str], prefix: str, meg: MegatronConfig) -> None:
    default = MegatronConfig()
    alternatives = {
        "tensor_model_parallel_size": "tensor parallelism in training needs the Megatron back-end",
        "pipeline_model_parallel_size": "pipeline parallelism needs a back-end that is not available; "
        "use FSDP data parallelism (trainer.nnodes / trainer.n_gpus_per_node)",
        "virtual_pipeline_model_parallel_size": "pipeline parallelism needs a back-end that is not available",
        "context_parallel_size": "context parallelism needs a back-end that is not available; "
        "shorten data.max_response_length or use actor_rollout_ref.actor.use_dynamic_bsz=True",
        "expert_model_parallel_size": "expert parallelism is not available (no MoE back-end)",
        "sequence_parallel": "Megatron sequence parallelism is not available",
        "param_offload": "parameter offload needs the Megatron back-end",
        "grad_offload": "gradient offload needs the Megatron back-end",
        "optimizer_offload": "optimizer offload needs the Megatron back-end",
        "use_mbridge": "mbridge converts HF checkpoints for Megatron; mtprl reads HF checkpoints directly, "
        "leave it False",
        "use_dist_checkpointing": "Megatron dist-checkpointing is not available; mtprl saves HF checkpoints",
        "override_transformer_config": "Megatron transformer overrides have no effect without Megatron; use "
        "+actor_rollout_ref.model.override_config.<field>=... for the model config",
    }
    for name, why in alternatives.items():
        value = getattr(meg, name)
        if value != getattr(default, name):
            errors.append(f"{prefix}.megatron.{name}={value!r} is not available: {why}")


def _check_backends(errors: list[str], cfg: MtprlConfig) -> None:
    arr = cfg.actor_rollout_ref
    if arr.actor.strategy != "fsdp":
        errors.append(
            f"actor_rollout_ref.actor.strategy={arr.actor.strategy!r} is not available: the Megatron back-end is not "
            "part of mtprl; use actor_rollout_ref.actor.strategy=fsdp"
        )
    _check_megatron(errors, "actor_rollout_ref.actor", arr.actor.megatron)
    _check_megatron(errors, "actor_rollout_ref.ref", arr.ref.megatron)
    if arr.rollout.name in UNAVAILABLE_ROLLOUTS:
        errors.append(
            f"actor_rollout_ref.rollout.name={arr.rollout.name!r}: the {UNAVAILABLE_ROLLOUTS[arr.rollout.name]} "
            "back-end is not available; use actor_rollout_ref.rollout.name=native (MTP speculative decoding is "
            "built in: actor_rollout_ref.model.mtp.enable_rollout=True) or vllm"
        )
    else:
        _choice(errors, "actor_rollout_ref.rollout.name", arr.rollout.name, ROLLOUTS)
    if arr.rollout.name == "vllm":
        from mtprl.rollout.vllm_engine import config_problems

        errors.extend(config_problems(cfg))
    elif arr.rollout.tensor_model_parallel_size != 1:
        errors.append(
            f"actor_rollout_ref.rollout.tensor_model_parallel_size={arr.rollout.tensor_model_parallel_size} is not "
            "available: the native engine runs one model replica per worker; scale rollouts with more workers"
        )
    for who in ("actor", "ref"):
        sp = getattr(arr, who).ulysses_sequence_parallel_size
        if sp != 1:
            errors.append(
                f"actor_rollout_ref.{who}.ulysses_sequence_parallel_size={sp} is not available: sequence/context "
                "parallelism needs a back-end that is not available; use use_dynamic_bsz=True to bound memory"
            )
    world = cfg.trainer.nnodes * cfg.trainer.n_gpus_per_node
    for who in ("actor", "ref"):
        fsdp = getattr(arr, who).fsdp_config
        for name in ("param_offload", "optimizer_offload"):
            if getattr(fsdp, name) and world == 1 and cfg.trainer.device != "cpu":
                errors.append(
                    f"actor_rollout_ref.{who}.fsdp_config.{name}=True needs FSDP, which mtprl applies with more than "
                    "one rank (trainer.nnodes x trainer.n_gpus_per_node > 1); on one GPU leave it False"
                )
        size = fsdp.fsdp_size
        if size not in (-1, world):
            errors.append(
                f"actor_rollout_ref.{who}.fsdp_config.fsdp_size={size} is not available: mtprl shards over all "
                f"ranks (hybrid sharding is not built); leave it -1 (= {world} here)"
            )
    if cfg.algorithm.lam != 1.0:
        errors.append(f"algorithm.lam={cfg.algorithm.lam}: GAE's lambda needs a critic, and there is none "
                      "(GRPO family); leave it 1.0")
    if cfg.reward_model.enable:
        errors.append(
            "reward_model.enable=True is not available: learned reward models are not supported; use a "
            "rule-based reward (reward_model.reward_manager) or custom_reward_function.path"
        )
    if cfg.trainer.critic_warmup != 0:
        errors.append(f"trainer.critic_warmup={cfg.trainer.critic_warmup}: there is no critic (GRPO-family only)")
    world = cfg.trainer.nnodes * cfg.trainer.n_gpus_per_node
    if cfg.trainer.nnodes < 1 or cfg.trainer.n_gpus_per_node < 1:
        errors.append(f"trainer.nnodes={cfg.trainer.nnodes} and trainer.n_gpus_per_node={cfg.trainer.n_gpus_per_node} "
                      "must be >= 1")
    elif world > 1 and (cfg.data.gen_batch_size or cfg.data.train_batch_size) % world:
        errors.append(
            f"data.gen_batch_size={cfg.data.gen_batch_size or cfg.data.train_batch_size} must be a multiple of the {world} ranks "
            "(trainer.nnodes x trainer.n_gpus_per_node): each rank generates whole prompt groups of an equal share")
    fg = cfg.algorithm.filter_groups
    if world > 1 and fg.enable and fg.metric == "seq_final_reward" and cfg.algorithm.use_kl_in_reward:
        errors.append("algorithm.filter_groups.metric=seq_final_reward with algorithm.use_kl_in_reward=True is not "
                      "available with more than one rank (it needs log-probs of every generation batch before the "
                      "filter); filter on seq_reward or acc, or run on one process")
    if cfg.trainer.collective_timeout_s <= 0:
        errors.append(f"trainer.collective_timeout_s={cfg.trainer.collective_timeout_s} must be > 0 (seconds)")
    if cfg.actor_rollout_ref.rollout.update_weights_bucket_megabytes < 1:
        errors.append("actor_rollout_ref.rollout.update_weights_bucket_megabytes="
                      f"{cfg.actor_rollout_ref.rollout.update_weights_bucket_megabytes} must be >= 1")


def _check_mtp(errors: list[str], cfg: MtprlConfig) -> None:
    mtp = cfg.actor_rollout_ref.model.mtp
    pre = "actor_rollout_ref.model.mtp"
    if (mtp.enable_train or mtp.enable_rollout) and not mtp.enable:
        errors.append(f"{pre}.enable_train / enable_rollout need {pre}.enable=True (the MTP layers must be loaded)")
    if mtp.mtp_loss_scaling_factor < 0:
        errors.append(f"{pre}.mtp_loss_scaling_factor={mtp.mtp_loss_scaling_factor} must be >= 0")
    _choice(errors, f"{pre}.loss_type", mtp.loss_type, MTP_LOSS_TYPES)
    _choice(errors, f"{pre}.speculative_algorithm", mtp.speculative_algorithm.upper(), MTP_DRAFT_ALGORITHMS,
            why=" (drafts come from the model's own MTP layers)")
    _positive(errors, f"{pre}.num_layers", mtp.num_layers, allow_none=True)
    if mtp.recursive_steps < 0:
        errors.append(f"{pre}.recursive_steps={mtp.recursive_steps} must be >= 0 (0 = off; K trains depths up to K)")
    if mtp.lr is not None:
        if not mtp.lr > 0:
            errors.append(f"{pre}.lr={mtp.lr} must be > 0 (null = the actor's optim.lr)")
        elif not (mtp.enable and mtp.enable_train):
            errors.append(f"{pre}.lr={mtp.lr} is set but the MTP layers are not trained ({pre}.enable_train=False"
                          f"{'' if mtp.enable else ', enable=False'}): drop it or enable MTP training")
    tau = mtp.speculative_draft_temperature
    if tau is not None and not tau > 0:
        errors.append(f"{pre}.speculative_draft_temperature={tau} must be > 0 (null = the sampling temperature)")
    steps, topk, ndt = mtp.speculative_num_steps, mtp.speculative_eagle_topk, mtp.speculative_num_draft_tokens
    if steps < 1 or topk < 1:
        errors.append(f"{pre}.speculative_num_steps={steps} and speculative_eagle_topk={topk} must be >= 1")
        return
    full_tree = sum(topk**d for d in range(1, steps + 1))  # draft nodes of a complete top-k tree
    if topk == 1 and ndt != steps + 1:
        errors.append(
            f"{pre}.speculative_num_draft_tokens={ndt} must equal speculative_num_steps + 1 = {steps + 1} "
            "when speculative_eagle_topk=1 (a chain verifies its K drafts plus the root)"
        )
    elif not steps + 1 <= ndt <= full_tree + 1:
        errors.append(
            f"{pre}.speculative_num_draft_tokens={ndt} must lie in [{steps + 1}, {full_tree + 1}] for "
            f"speculative_num_steps={steps}, speculative_eagle_topk={topk} (root + at most the full top-k tree)"
        )


def _check_batches(errors: list[str], cfg: MtprlConfig) -> None:
    data, actor, rollout = cfg.data, cfg.actor_rollout_ref.actor, cfg.actor_rollout_ref.rollout
    for key, value in (
        ("data.max_prompt_length", data.max_prompt_length),
        ("data.max_response_length", data.max_response_length),
        ("data.train_batch_size", data.train_batch_size),
        ("data.gen_batch_size", data.gen_batch_size),
        ("actor_rollout_ref.rollout.n", rollout.n),
        ("actor_rollout_ref.actor.ppo_mini_batch_size", actor.ppo_mini_batch_size),
        ("actor_rollout_ref.actor.ppo_epochs", actor.ppo_epochs),
        ("actor_rollout_ref.actor.ppo_max_token_len_per_gpu", actor.ppo_max_token_len_per_gpu),
        ("actor_rollout_ref.rollout.max_num_seqs", rollout.max_num_seqs),
        ("actor_rollout_ref.rollout.max_num_batched_tokens", rollout.max_num_batched_tokens),
    ):
        _positive(errors, key, value)
    _positive(errors, "data.val_batch_size", data.val_batch_size, allow_none=True)
    if data.gen_batch_size != data.train_batch_size and not cfg.algorithm.filter_groups.enable:
        errors.append(
            f"data.gen_batch_size={data.gen_batch_size} differs from data.train_batch_size={data.train_batch_size}: "
            "a separate generation batch only applies with dynamic sampling (algorithm.filter_groups.enable=True)"
        )
    _positive(errors, "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu", actor.ppo_micro_batch_size_per_gpu,
              allow_none=True)
    for who in ("rollout", "ref"):  # old / reference log-probs: a size <= 0 would split into no micro-batch at all
        own = getattr(cfg.actor_rollout_ref, who)
        _positive(errors, f"actor_rollout_ref.{who}.log_prob_micro_batch_size_per_gpu",
                  own.log_prob_micro_batch_size_per_gpu, allow_none=True)
        _positive(errors, f"actor_rollout_ref.{who}.log_prob_max_token_len_per_gpu", own.log_prob_max_token_len_per_gpu)
    _positive(errors, "actor_rollout_ref.rollout.val_kwargs.n", rollout.val_kwargs.n)
    _positive(errors, "actor_rollout_ref.actor.loss_scale_factor", actor.loss_scale_factor, allow_none=True)
    _positive(errors, "sft.micro_batch_size_per_gpu", cfg.sft.micro_batch_size_per_gpu, allow_none=True)
    _positive(errors, "sft.max_token_len_per_gpu", cfg.sft.max_token_len_per_gpu)
    if cfg.sft.use_dynamic_bsz and cfg.sft.max_token_len_per_gpu < data.max_prompt_length + data.max_response_length:
        errors.append(
            f"sft.max_token_len_per_gpu={cfg.sft.max_token_len_per_gpu} is below the longest SFT example "
            f"(data.max_prompt_length + data.max_response_length = {data.max_prompt_length + data.max_response_length})"
            ": raise it or turn sft.use_dynamic_bsz off")
    if actor.ppo_mini_batch_size > 0 and data.train_batch_size % max(actor.ppo_mini_batch_size, 1):
        errors.append(
            f"actor_rollout_ref.actor.ppo_mini_batch_size={actor.ppo_mini_batch_size} must divide "
            f"data.train_batch_size={data.train_batch_size} (both count prompts)"
        )
    micro = actor.ppo_micro_batch_size_per_gpu
    if micro and actor.ppo_mini_batch_size > 0 and (actor.ppo_mini_batch_size * rollout.n) % micro:
        errors.append(
            f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={micro} must divide the mini-batch of "
            f"ppo_mini_batch_size x rollout.n = {actor.ppo_mini_batch_size * rollout.n} samples"
        )
    if actor.use_dynamic_bsz and actor.ppo_max_token_len_per_gpu < data.max_prompt_length + data.max_response_length:
        errors.append(
            f"actor_rollout_ref.actor.ppo_max_token_len_per_gpu={actor.ppo_max_token_len_per_gpu} is smaller than one "
            f"sequence (max_prompt_length + max_response_length = {data.max_prompt_length + data.max_response_length})"
        )
    if not 0 <= rollout.top_p <= 1 or not 0 <= rollout.val_kwargs.top_p <= 1:
        errors.append("actor_rollout_ref.rollout.top_p and val_kwargs.top_p must lie in [0, 1]")
    if rollout.temperature < 0 or rollout.val_kwargs.temperature < 0:
        errors.append("actor_rollout_ref.rollout.temperature and val_kwargs.temperature must be >= 0")
    if not 0 < rollout.gpu_memory_utilization <= 1:
        errors.append(f"actor_rollout_ref.rollout.gpu_memory_utilization={rollout.gpu_memory_utilization} must lie in (0, 1]")
    if not rollout.cpu_kv_cache_gb > 0:
        errors.append(f"actor_rollout_ref.rollout.cpu_kv_cache_gb={rollout.cpu_kv_cache_gb} must be > 0 (GiB the CPU "
                      "rollout KV cache may take)")


def _check_algorithm(errors: list[str], cfg: MtprlConfig) -> None:
    actor, alg = cfg.actor_rollout_ref.actor, cfg.algorithm
    if actor.clip_ratio_c <= 1:
        errors.append(f"actor_rollout_ref.actor.clip_ratio_c={actor.clip_ratio_c} must be > 1 (dual-clip bound)")
    if actor.clip_ratio_low < 0 or actor.clip_ratio_high < 0 or actor.clip_ratio_low >= 1:
        errors.append("actor_rollout_ref.actor.clip_ratio_low must lie in [0, 1) and clip_ratio_high must be >= 0")
    # the registries, so that a name a user registers (ADV_ESTIMATORS.register("my_est")) validates
    from mtprl.algorithms import ADV_ESTIMATORS, KL_PENALTIES, LOSS_AGG_MODES

    _choice(errors, "actor_rollout_ref.actor.loss_agg_mode", actor.loss_agg_mode, LOSS_AGG_MODES.names())
    _choice(errors, "actor_rollout_ref.actor.kl_loss_type", actor.kl_loss_type, KL_PENALTIES.names())
    _choice(errors, "algorithm.kl_penalty", alg.kl_penalty, KL_PENALTIES.names())
    _choice(errors, "algorithm.adv_estimator", alg.adv_estimator, ADV_ESTIMATORS.names())
    _choice(errors, "algorithm.kl_ctrl.type", alg.kl_ctrl.type, ("fixed", "adaptive"))
    _choice(errors, "algorithm.filter_groups.metric", alg.filter_groups.metric, FILTER_METRICS)
    if alg.kl_ctrl.type == "adaptive" and alg.kl_ctrl.horizon <= 0:
        errors.append(f"algorithm.kl_ctrl.horizon={alg.kl_ctrl.horizon} must be > 0 with algorithm.kl_ctrl.type=adaptive")
    if alg.filter_groups.max_num_gen_batches < 0:
        errors.append("algorithm.filter_groups.max_num_gen_batches must be >= 0 (0 = unlimited)")
    _choice(errors, "actor_rollout_ref.actor.optim.warmup_style", actor.optim.warmup_style, ("constant", "cosine"))
    if actor.optim.lr < 0 or actor.optim.weight_decay < 0 or actor.optim.clip_grad <= 0:
        errors.append("actor_rollout_ref.actor.optim: lr and weight_decay must be >= 0 and clip_grad > 0")
    if len(actor.optim.betas) != 2:
        errors.append(f"actor_rollout_ref.actor.optim.betas={actor.optim.betas} must hold two numbers")
    if actor.max_bad_steps < 1:
        errors.append("actor_rollout_ref.actor.max_bad_steps must be >= 1")


def _check_reward_and_data(errors: list[str], cfg: MtprlConfig) -> None:
    rm, data = cfg.reward_model, cfg.data
    _choice(errors, "reward_model.reward_manager", rm.reward_manager, REWARD_MANAGERS)
    buf = rm.reward_kwargs.overlong_buffer_cfg
    max_resp = rm.reward_kwargs.max_resp_len
    if buf.enable:
        if buf.len <= 0:
            errors.append(f"reward_model.reward_kwargs.overlong_buffer_cfg.len={buf.len} must be > 0 when enabled")
        if max_resp is not None and buf.len > max_resp:
            errors.append(
                f"reward_model.reward_kwargs.overlong_buffer_cfg.len={buf.len} must be <= "
                f"reward_model.reward_kwargs.max_resp_len={max_resp}"
            )
        if rm.reward_manager != "dapo":
            errors.append("reward_model.reward_kwargs.overlong_buffer_cfg.enable=True needs reward_model.reward_manager=dapo")
    if max_resp is not None and max_resp <= 0 and max_resp != data.max_response_length:  # else reported once
        errors.append(f"reward_model.reward_kwargs.max_resp_len={max_resp} must be > 0")
    if rm.num_workers < 0 or rm.timeout_s <= 0:
        errors.append("reward_model.num_workers must be >= 0 and reward_model.timeout_s > 0")
    _choice(errors, "data.truncation", data.truncation, TRUNCATIONS)


def _check_trainer(errors: list[str], cfg: MtprlConfig) -> None:
    tr = cfg.trainer
    for name in tr.logger:
        _choice(errors, "trainer.logger", name, LOGGERS)
        if name in ("wandb", "mlflow") and importlib.util.find_spec(name) is None:
            errors.append(f"trainer.logger includes '{name}' but the {name} package is not installed: "
                          f"pip install 'mtprl[{name}]'")
    _choice(errors, "trainer.device", tr.device, DEVICES)
    _choice(errors, "actor_rollout_ref.model.dtype", cfg.actor_rollout_ref.model.dtype, DTYPES)
    if cfg.actor_rollout_ref.model.dtype == "float16":
        errors.append("actor_rollout_ref.model.dtype=float16 is not supported: fp16 training needs loss scaling, "
                      "which mtprl does not do; use bfloat16 (mixed precision: fp32 weights, bf16 autocast) or "
                      "float32")
    _choice(errors, "trainer.resume_mode", tr.resume_mode, ("auto", "disable", "resume_path"))
    if tr.resume_mode == "resume_path" and not tr.resume_from_path:
        errors.append("trainer.resume_mode=resume_path needs trainer.resume_from_path")
    if tr.resume_from_path and tr.resume_mode != "resume_path":
        errors.append(
            f"trainer.resume_from_path is set but trainer.resume_mode={tr.resume_mode!r} does not read it "
            "(auto resumes from the latest checkpoint in trainer.default_local_dir); set trainer.resume_mode=resume_path"
        )
    if tr.max_actor_ckpt_to_keep is not None and tr.max_actor_ckpt_to_keep < 0:
        errors.append(f"trainer.max_actor_ckpt_to_keep={tr.max_actor_ckpt_to_keep} must be >= 1, or null / 0 to keep all")
    if tr.log_val_generations < 0:
        errors.append(f"trainer.log_val_generations={tr.log_val_generations} must be >= 0")
    _positive(errors, "trainer.total_epochs", tr.total_epochs)
    _positive(errors, "trainer.total_training_steps", tr.total_training_steps, allow_none=True)
    for key, value in (("trainer.save_freq", tr.save_freq), ("trainer.test_freq", tr.test_freq)):
        if value == 0 or value < -1:
            errors.append(f"{key}={value} must be a positive number of steps or -1 (never)")
    if tr.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            errors.append("trainer.device=cuda but no CUDA device is visible; use trainer.device=cpu or auto")


def validate_config(cfg: MtprlConfig) -> None:
    errors: list[str] = []
    for check in (_check_backends, _check_mtp, _check_batches, _check_algorithm, _check_reward_and_data, _check_trainer):
        check(errors, cfg)
    if errors:
        raise ConfigError("\n".join(errors))
