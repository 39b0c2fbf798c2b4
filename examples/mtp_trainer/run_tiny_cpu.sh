#!/usr/bin/env bash
# DAPO + MTP on a laptop CPU, written the way the seed's recipe is written (verl override style).
# Builds the tiny inputs (data, tokenizer, SFT-warmed policy) if they are missing, then runs `mtprl train`.
# MTPRL_CMD="config show" prints the resolved config instead of training.
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK=${WORK:-runs/tiny_cpu_example}
PY=${PY:-.venv/bin/python}

if [ "${MTPRL_CMD:-train}" = train ] && [ ! -f "$WORK/policy/config.json" ]; then
  # synthetic math data + tokenizer + a small SFT-warmed MiMo-style policy (trunk + MTP layers)
  $PY - "$WORK" <<'PY'
import sys
from pathlib import Path
from mtprl.config import load_config
from mtprl.data import build_math_tokenizer, load_tokenizer, write_synthetic_math
from mtprl.demo import DemoSize, policy_config, sft_overrides
from mtprl.trainer.policy import init_policy_checkpoint
from mtprl.trainer.sft import run_sft
import shutil
work = Path(sys.argv[1]); size = DemoSize(sft_steps=150)
data = write_synthetic_math(work / "data", num_train=2000, num_val=64, seed=0, levels=size.levels)
tok = build_math_tokenizer(work / "tokenizer", vocab_size=384, seed=0)
init = init_policy_checkpoint(work / "init", policy_config(size, -(-len(load_tokenizer(tok)) // 8) * 8), tok, seed=0)
final = run_sft(load_config("tiny_cpu", sft_overrides(work, data, init, size)))
shutil.copytree(final, work / "policy")
PY
fi

# --- the seed's variables ---
max_prompt_length=64
max_response_length=48
enable_overlong_buffer=True
overlong_buffer_len=16
overlong_penalty_factor=1.0
train_prompt_bsz=16
n_resp_per_prompt=8
train_prompt_mini_bsz=8

common_params=(
    actor_rollout_ref.model.mtp.enable=True
    actor_rollout_ref.model.mtp.enable_train=True
    actor_rollout_ref.model.mtp.mtp_loss_scaling_factor=0.1
    actor_rollout_ref.model.mtp.detach_encoder=True
    actor_rollout_ref.model.mtp.enable_rollout=True
    actor_rollout_ref.model.mtp.speculative_algorithm=EAGLE
    actor_rollout_ref.model.mtp.speculative_num_steps=3
    actor_rollout_ref.model.mtp.speculative_eagle_topk=1
    actor_rollout_ref.model.mtp.speculative_num_draft_tokens=4
)

$PY -m mtprl ${MTPRL_CMD:-train} \
    data.train_files="$WORK/data/train.parquet" \
    data.val_files="$WORK/data/val.parquet" \
    data.max_prompt_length=${max_prompt_length} \
    data.max_response_length=${max_response_length} \
    data.train_batch_size=${train_prompt_bsz} \
    data.gen_batch_size=$((train_prompt_bsz * 2)) \
    actor_rollout_ref.rollout.n=${n_resp_per_prompt} \
    actor_rollout_ref.actor.ppo_mini_batch_size=${train_prompt_mini_bsz} \
    actor_rollout_ref.model.path="$WORK/policy" \
    algorithm.adv_estimator=grpo \
    algorithm.use_kl_in_reward=False \
    algorithm.kl_ctrl.kl_coef=0.0 \
    algorithm.filter_groups.enable=True \
    algorithm.filter_groups.max_num_gen_batches=8 \
    actor_rollout_ref.actor.use_kl_loss=False \
    actor_rollout_ref.actor.kl_loss_coef=0.0 \
    actor_rollout_ref.actor.clip_ratio_low=0.2 \
    actor_rollout_ref.actor.clip_ratio_high=0.28 \
    actor_rollout_ref.actor.optim.lr=2e-4 \
    actor_rollout_ref.actor.optim.clip_grad=1.0 \
    reward_model.reward_manager=dapo \
    reward_model.num_workers=0 \
    +reward_model.reward_kwargs.overlong_buffer_cfg.enable=${enable_overlong_buffer} \
    +reward_model.reward_kwargs.overlong_buffer_cfg.len=${overlong_buffer_len} \
    +reward_model.reward_kwargs.overlong_buffer_cfg.penalty_factor=${overlong_penalty_factor} \
    +reward_model.reward_kwargs.max_resp_len=${max_response_length} \
    trainer.logger='["console","jsonl","tensorboard"]' \
    trainer.total_training_steps=${STEPS:-20} \
    trainer.test_freq=5 \
    trainer.save_freq=10 \
    trainer.val_before_train=True \
    trainer.log_val_generations=4 \
    trainer.default_local_dir="$WORK/rl" \
    "${common_params[@]}" "$@"
