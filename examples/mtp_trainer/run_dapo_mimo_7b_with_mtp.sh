#!/usr/bin/env bash
# The seed recipe: DAPO on MiMo-7B-RL with MTP training and MTP speculative rollouts,
# DAPO-Math-17k for training, AIME-2024 for validation. Paths come from the environment:
#   MODEL_PATH  a local MiMo-7B-RL directory (config.json, safetensors, tokenizer; max_position_embeddings
#               raised to 32768 as the seed says)
#   TRAIN_FILE  DAPO-Math-17k in verl's schema (convert with examples/data/dapo_math_17k.py)
#   TEST_FILE   AIME-2024 in verl's schema (examples/data/aime_2024.py)
#   CKPTS_DIR   where checkpoints, metrics.jsonl and TensorBoard logs go
#   MTPRL_CMD   "config show" prints the resolved config instead of training
#   ROLLOUT     vllm (default; the `vllm` extra) or native
#
#   NNODES, NGPUS_PER_NODE   the layout (default the seed's 16 x 8); RAY_ADDRESS=auto joins the Ray cluster
#               started on the nodes (see README "Scale-out": `ray start --head` on the first node,
#               `ray start --address=<head>:6379` on the others), then run this script on the head node
#
# How the seed's 16-node settings map onto mtprl's back-ends:
#   Megatron (train_tp=2, train_pp=2, train_cp=2, offload=True, use_mbridge)  -> FSDP2 data parallelism over all
#       NNODES x NGPUS_PER_NODE ranks (one per GPU, nccl), offload=True -> fsdp_config.param_offload /
#       optimizer_offload (FSDP2 CPU offload); Megatron TP/PP/CP keys are rejected by validation with the reason.
#   SGLang + EAGLE (rollout.name=sglang, gen_tp=4, gpu_memory_utilization)     -> vLLM colocated on every rank
#       (rollout.name=vllm, the `vllm` extra: pip install -e '.[vllm]') with MiMo's MTP layer as its drafter
#       (speculative_config method "mtp"). SGLang's EAGLE settings map as: speculative_num_steps=2 ->
#       num_speculative_tokens=2 (a chain: the one MTP layer drafts twice); speculative_eagle_topk=2 /
#       speculative_num_draft_tokens=4 (a tree of 3 draft nodes) have no vLLM equivalent -> topk 1 and 1 + K = 3
#       verified tokens; gpu_memory_utilization -> vLLM's own (share of the GPU for weights + KV cache), and
#       free_cache_engine=True -> vLLM's sleep / wake_up around the update. gen_tp=4 -> each rank runs the whole
#       7B model (tensor-parallel rollouts are not available yet, docs/rollout.md). Every rank's engine gets the
#       updated weights, MTP drafter included, from the FSDP shards after every step. ROLLOUT=native switches to
#       mtprl's own engine (tree drafts with speculative_eagle_topk=2, no vLLM needed).
#       Before a long run, check that this machine's vLLM build samples exactly with speculation (a minute):
#         python -m mtprl check-rollout --backend vllm --model "$MODEL_PATH" --device cuda --prompt "1+1="
#   runtime_env.yaml                                                           -> --runtime-env (this folder's).
set -euo pipefail
: "${MODEL_PATH:?set MODEL_PATH to a local MiMo-7B-RL directory}"
: "${TRAIN_FILE:?set TRAIN_FILE to DAPO-Math-17k in verl's parquet schema}"
: "${TEST_FILE:?set TEST_FILE to AIME-2024 in verl's parquet schema}"
CKPTS_DIR=${CKPTS_DIR:-$HOME/ckpts/dapo_mimo_7b_mtp}

max_prompt_length=$((1024 * 2))
max_response_length=$((1024 * 8))
enable_overlong_buffer=True
overlong_buffer_len=$((1024 * 4))
overlong_penalty_factor=1.0
train_prompt_bsz=128
n_resp_per_prompt=16
train_prompt_mini_bsz=32

common_params=(
    actor_rollout_ref.model.mtp.enable=True
    actor_rollout_ref.model.mtp.enable_train=True
    actor_rollout_ref.model.mtp.mtp_loss_scaling_factor=0.1
    actor_rollout_ref.model.mtp.detach_encoder=True
    actor_rollout_ref.model.mtp.enable_rollout=True
    actor_rollout_ref.model.mtp.speculative_algorithm=EAGLE
    actor_rollout_ref.model.mtp.speculative_num_steps=2
)
if [ "${ROLLOUT:-vllm}" = vllm ]; then
    common_params+=(
        actor_rollout_ref.rollout.name=vllm
        actor_rollout_ref.model.mtp.speculative_eagle_topk=1
        actor_rollout_ref.model.mtp.speculative_num_draft_tokens=3
        # vLLM's share of the card beside the trainer's own bf16 copy (14.6 GiB): 0.8 leaves ~1 GiB, 0.6 leaves ~16
        # GiB and still holds 22 full-length rows for the 16 sequences of a rank (`mtprl plan`, docs/distributed.md)
        actor_rollout_ref.rollout.gpu_memory_utilization=0.6
    )
else
    common_params+=(
        actor_rollout_ref.rollout.name=native
        actor_rollout_ref.model.mtp.speculative_eagle_topk=2
        actor_rollout_ref.model.mtp.speculative_num_draft_tokens=4
    )
fi

here=$(cd "$(dirname "$0")" && pwd)
launch=()
if [ "${MTPRL_CMD:-train}" = train ]; then launch=(--runtime-env "${here}/runtime_env.yaml"); fi

${PYTHON:-python} -m mtprl ${MTPRL_CMD:-train} "${launch[@]}" --config-name dapo_mimo_7b \
    trainer.nnodes=${NNODES:-16} \
    trainer.n_gpus_per_node=${NGPUS_PER_NODE:-8} \
    ray_kwargs.ray_init.address=${RAY_ADDRESS:-auto} \
    actor_rollout_ref.actor.fsdp_config.param_offload=True \
    actor_rollout_ref.actor.fsdp_config.optimizer_offload=True \
    data.train_files="${TRAIN_FILE}" \
    data.val_files="${TEST_FILE}" \
    data.max_prompt_length=${max_prompt_length} \
    data.max_response_length=${max_response_length} \
    data.train_batch_size=${train_prompt_bsz} \
    actor_rollout_ref.rollout.n=${n_resp_per_prompt} \
    actor_rollout_ref.actor.ppo_mini_batch_size=${train_prompt_mini_bsz} \
    actor_rollout_ref.model.path="${MODEL_PATH}" \
    actor_rollout_ref.model.dtype=bfloat16 \
    trainer.device=cuda \
    algorithm.adv_estimator=grpo \
    algorithm.use_kl_in_reward=False \
    algorithm.kl_ctrl.kl_coef=0.0 \
    actor_rollout_ref.actor.use_kl_loss=False \
    actor_rollout_ref.actor.kl_loss_coef=0.0 \
    actor_rollout_ref.actor.clip_ratio_low=0.2 \
    actor_rollout_ref.actor.clip_ratio_high=0.28 \
    actor_rollout_ref.actor.optim.clip_grad=1.0 \
    actor_rollout_ref.actor.use_dynamic_bsz=True \
    actor_rollout_ref.rollout.enable_chunked_prefill=True \
    reward_model.reward_manager=dapo \
    +reward_model.reward_kwargs.overlong_buffer_cfg.enable=${enable_overlong_buffer} \
    +reward_model.reward_kwargs.overlong_buffer_cfg.len=${overlong_buffer_len} \
    +reward_model.reward_kwargs.overlong_buffer_cfg.penalty_factor=${overlong_penalty_factor} \
    +reward_model.reward_kwargs.max_resp_len=${max_response_length} \
    trainer.logger='["console","tensorboard"]' \
    trainer.total_epochs=10 \
    trainer.total_training_steps=400 \
    trainer.test_freq=10 \
    trainer.save_freq=-1 \
    trainer.val_before_train=False \
    trainer.log_val_generations=10 \
    trainer.default_local_dir="${CKPTS_DIR}" \
    actor_rollout_ref.rollout.prometheus.enable=True \
    actor_rollout_ref.rollout.prometheus.port=44398 \
    "${common_params[@]}" "$@"
