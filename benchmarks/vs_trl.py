"""A DAPO step, mtprl vs TRL's GRPOTrainer, side by side on one CPU; and the step measured against the machine.

    .venv/bin/python -m pip install -e '.[bench]'          # TRL (and its accelerate / datasets)
    .venv/bin/python benchmarks/vs_trl.py [--shapes demo,25m] [--rounds 3] [--threads 1] [--work runs/bench_vs_trl]
                                          [--steps-demo 6] [--steps-25m 3] [--skip-limits] [--limits-only]
                                          [--configs trl_fp32,off,...] [--limits-new-tokens 128] [--limits-repeats 5]
                                          [--malloc-keep]
    .venv/bin/python benchmarks/vs_trl.py --check   # no TRL needed, seconds: the configs and the limits model

Shapes (same HF checkpoint, same prompts, same settings on both sides):
  demo  the model of mtprl's first demo, fixed here (DEMO_MODEL, DEMO_DATA: short synthetic math, a 384-token BPE
        tokenizer, a 1M-parameter MiMo policy with 3 MTP layers, 300 SFT steps; built once into --work, ~3-5 min),
        48 new tokens at most;
  25m   a random 25M-parameter Qwen2 (hidden 512, 8 layers, 8/4 heads, SwiGLU 1536, the demo's tokenizer), 128
        new tokens at most (a random model rarely stops: ~116 tokens a row, every reward -1).
Settings: 8 prompts x 8 samples per step (the first prompts of the demo's train.parquet, in file order),
temperature 1 (no top-k / top-p), lr 1e-5 constant, AdamW (0.9, 0.999, eps 1e-8, no weight decay), grad clip 1,
one optimizer step per batch (one PPO epoch, one mini-batch: on-policy, the old log-probs are the update's own on
both sides), clip 0.2 / 0.28, token-mean (TRL loss_type="dapo"), no KL (beta 0), no dynamic sampling, no
overlong shaping; reward = mtprl's DAPO math scorer on both sides; GRPO advantages ((r - mean) / std per group;
TRL adds 1e-4 to the std, we 1e-6).
Configurations (each in its own process, so peak RSS is its own; the order rotates every round):
  trl_fp32  TRL, fp32 (bf16=False): the same precision as ours;  trl_bf16  TRL's default (bf16=True: autocast to
  bf16 over fp32 weights, which on an AVX512-BF16 CPU runs matmuls ~4x faster; also a precision change);
  off       mtprl, speculation off (the MTP layers unused: the work TRL does);
  off_bf16  the same with actor_rollout_ref.model.dtype=bfloat16: mixed precision like trl_bf16 (fp32 weights and
            AdamW state, the update's forward / backward under bf16 autocast, log-softmax and loss in fp32; the
            rollout stays fp32: the engine shares the fp32 weights);
  on        mtprl, speculative rollouts with the MTP layers (a chain of 3 drafts, as the demo), MTP not trained;
  adaptive  the same with mtp.adaptive=True (the engine picks 0..3 draft steps per decode step);
  on_train  the demo's RL setting: speculative rollouts and MTP training (informational; demo shape only).
Step time = generation to optimizer step (TRL: on_step_begin -> on_step_end; mtprl: rl_step). Each worker runs
--steps-* steps; its first is a warm-up (first-call costs on both sides), reported separately; the figure is the
median of the others over all rounds. Phase times: ours from timing_s/*; TRL's from wrapped methods
(_generate, the rest of _generate_and_score_completions = reward + advantages, compute_loss = the forward,
accelerator.backward), "other" = the rest (optimizer, logging).
Limits (ours, same process as the measurement): the update's FLOP/s (executed: 6 x matmul params x tokens through
the projections + attention; model: the same over every sample's tokens as if each ran alone) against the best
of large fp32 matmuls; and (--limits, its own process) batch-1 decoding of a ~100M-parameter fp32 model against
the memory-bandwidth bound = copy bandwidth (2 x bytes / time of a 512 MB copy) / weight bytes per token, plain,
speculative (3 draft steps) and adaptive (a confident random LM with a one-layer MTP draft; see confident_lm).
The machine is shared: medians of alternating rounds, ratios of medians; torch runs --threads threads on both.
--check runs nothing: it resolves every mtprl configuration's overrides (and the demo shape's SFT run's) through
mtprl's config validation and builds the limits model, and prints what they set as one JSON object (the suite
runs it, so a config key the benchmark sets cannot go stale unnoticed).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {"demo": dict(new_tokens=48, configs=("trl_fp32", "trl_bf16", "off", "off_bf16", "on", "adaptive",
                                               "on_train")),
          "25m": dict(new_tokens=128, configs=("trl_fp32", "trl_bf16", "off", "off_bf16"))}
PROMPTS, N = 8, 8


# ----------------------------------------------------------------------------------------------- set-up
# The "demo" shape: the model the issue measured (mtprl's first demo), fixed here so that the benchmark does not
# move with the demo: a MiMo-style policy, hidden 128, 4 trunk layers, 3 MTP layers, 4 / 2 heads, SwiGLU 384, tied
# embeddings, attention bias; the short synthetic levels (1, 1, 1, 2) with 70% prose SFT answers; a 384-token BPE
# vocabulary; 300 SFT steps at batch 64, lr 3e-3 cosine (20 warm-up steps, down to 0.1x), MTP loss weight 1.0.
DEMO_LEVELS = (1, 1, 1, 2)  # mtprl.data.synthetic.TINY_MODEL_LEVELS
DEMO_DATA = dict(num_train=4000, num_val=128, seed=0, levels=DEMO_LEVELS, sft_prose_frac=0.7)
DEMO_MODEL = dict(model_type="mimo", hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0,
                  max_position_embeddings=256, tie_word_embeddings=True, attention_bias=True, num_mtp_layers=3)
DEMO_SFT_STEPS = 300


def demo_sft_overrides(work: Path, data, init: Path) -> list[str]:
    """Every key the SFT run reads, set explicitly (the tiny_cpu preset under it changes with the demo)."""
    a, mtp, optim = "actor_rollout_ref.actor.", "actor_rollout_ref.model.mtp.", "actor_rollout_ref.actor.optim."
    return [f"data.train_files={data.sft_train}", f"data.val_files={data.sft_val}", "data.max_prompt_length=64",
            "data.max_response_length=48", "data.train_batch_size=64", "data.truncation=error", "data.seed=1",
            "data.shuffle=True", f"{a}ppo_mini_batch_size=64", f"{a}ppo_micro_batch_size_per_gpu=32",
            "sft.micro_batch_size_per_gpu=null", "sft.freeze_trunk=False",
            f"actor_rollout_ref.model.path={init}", f"{mtp}enable=True", f"{mtp}enable_train=True",
            f"{mtp}enable_rollout=True", f"{mtp}mtp_loss_scaling_factor=1.0", f"{mtp}detach_encoder=True",
            f"{mtp}recursive_steps=0", f"{optim}lr=3e-3", f"{optim}warmup_style=cosine", f"{optim}lr_warmup_steps=20",
            f"{optim}min_lr_ratio=0.1", f"{optim}weight_decay=0.0", f"{optim}clip_grad=1.0",
            f"trainer.total_training_steps={DEMO_SFT_STEPS}", f"trainer.test_freq={DEMO_SFT_STEPS // 4}",
            "trainer.save_freq=-1", "trainer.logger=[jsonl]", f"trainer.default_local_dir={work / 'sft'}",
            "trainer.experiment_name=bench_demo_sft", "trainer.seed=1", "trainer.total_epochs=1", "trainer.resume_mode=disable"]


def prepare(work: Path) -> dict[str, str]:
    """The checkpoints and data (built once into ``work``): the demo-shape SFT model, a random 25M Qwen2."""
    from rich.console import Console

    from mtprl.config import load_config
    from mtprl.data import build_math_tokenizer, load_tokenizer, write_synthetic_math
    from mtprl.model import ModelConfig
    from mtprl.trainer.policy import init_policy_checkpoint
    from mtprl.trainer.sft import run_sft

    sft = work / "sft" / f"global_step_{DEMO_SFT_STEPS}" / "actor"
    paths = {"demo": str(sft), "25m": str(work / "random_25m"), "train": str(work / "data" / "train.parquet"),
             "tokenizer": str(work / "tokenizer")}
    if not sft.is_dir():
        print(f"building the demo-shape SFT model in {work} (once, ~3-5 min) ...", flush=True)
        data = write_synthetic_math(work / "data", **DEMO_DATA)
        tok = build_math_tokenizer(work / "tokenizer", vocab_size=384, num_problems=2000, seed=0)
        vocab = -(-len(load_tokenizer(tok)) // 8) * 8
        init = init_policy_checkpoint(work / "init", ModelConfig(vocab_size=vocab, **DEMO_MODEL), tok, seed=0)
        run_sft(load_config("tiny_cpu", demo_sft_overrides(work, data, init)), console=Console(quiet=True))
    if not Path(paths["25m"]).is_dir():
        vocab = -(-len(load_tokenizer(paths["tokenizer"])) // 8) * 8
        cfg = ModelConfig(model_type="qwen2", vocab_size=vocab, hidden_size=512, intermediate_size=1536,
                          num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, rms_norm_eps=1e-6,
                          rope_theta=10000.0, max_position_embeddings=512, tie_word_embeddings=True,
                          attention_bias=True, num_mtp_layers=0)
        init_policy_checkpoint(paths["25m"], cfg, paths["tokenizer"], seed=0)
    return paths


def matmul_params(model) -> int:
    """Weights a token goes through as matmuls: the trunk's projections and MLPs, and the output head."""
    c = model.config
    return sum(p.numel() for n, p in model.named_parameters()
               if n.startswith("layers.") and n.endswith("proj.weight")) + c.vocab_size * c.hidden_size


def machine_peaks() -> dict[str, float]:
    """Best fp32 and bf16 matmul FLOP/s (2048^3, the practical peaks) and copy bandwidth (2 x 512 MB / time)."""
    import torch

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    c = a @ b
    best = min(_timed(lambda: torch.mm(a, b, out=c)) for _ in range(8))
    a16, b16 = a.bfloat16(), b.bfloat16()
    c16 = a16 @ b16
    best16 = min(_timed(lambda: torch.mm(a16, b16, out=c16)) for _ in range(8))
    x = torch.empty(2**27)  # 512 MB
    x.normal_()
    y = torch.empty_like(x)
    copy = min(_timed(lambda: y.copy_(x)) for _ in range(6))
    return {"matmul_gflops": 2 * 2048**3 / best / 1e9, "matmul_bf16_gflops": 2 * 2048**3 / best16 / 1e9,
            "copy_gbps": 2 * x.numel() * 4 / copy / 1e9}


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _rss_mb() -> float:
    """This process's peak RSS (VmHWM: reset by exec, unlike getrusage's ru_maxrss, which a worker would inherit
    from the driver that forked it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------------------------- mtprl
def ours_overrides(paths: dict, shape: str, config: str) -> list[str]:
    ov = [f"data.train_files={paths['train']}", f"data.val_files={paths['train']}",
          f"actor_rollout_ref.model.path={paths[shape]}", f"data.train_batch_size={PROMPTS}",
          f"data.gen_batch_size={PROMPTS}", f"actor_rollout_ref.rollout.n={N}",
          f"actor_rollout_ref.actor.ppo_mini_batch_size={PROMPTS}", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=null",
          f"actor_rollout_ref.rollout.max_num_seqs={PROMPTS * N}",  # KV cache rows for one step's samples
          f"data.max_response_length={SHAPES[shape]['new_tokens']}", "data.shuffle=False",
          "algorithm.filter_groups.enable=False", "reward_model.reward_kwargs.overlong_buffer_cfg.enable=False",
          "reward_model.num_workers=0", "actor_rollout_ref.actor.optim.lr=1e-5",
          "actor_rollout_ref.actor.optim.lr_warmup_steps=0", "actor_rollout_ref.actor.optim.weight_decay=0.0",
          "actor_rollout_ref.actor.optim.clip_grad=1.0", "actor_rollout_ref.actor.clip_ratio_low=0.2",
          "actor_rollout_ref.actor.clip_ratio_high=0.28", "actor_rollout_ref.actor.loss_agg_mode=token-mean",
          "actor_rollout_ref.rollout.temperature=1.0", "actor_rollout_ref.rollout.top_k=-1",
          "actor_rollout_ref.rollout.top_p=1.0", "data.max_prompt_length=64", "reward_model.reward_manager=dapo",
          "trainer.logger=[]", "trainer.val_before_train=False",
          "trainer.test_freq=-1", "trainer.save_freq=-1", "trainer.resume_mode=disable"]
    mtp = "actor_rollout_ref.model.mtp."
    if config in ("off", "off_bf16"):
        return ov + [f"{mtp}enable=False", f"{mtp}enable_train=False", f"{mtp}enable_rollout=False",
                     f"actor_rollout_ref.model.dtype={'bfloat16' if config == 'off_bf16' else 'float32'}"]
    ov += [f"{mtp}enable=True", f"{mtp}enable_rollout=True", f"{mtp}enable_train={config == 'on_train'}",
           f"{mtp}speculative_num_steps=3", f"{mtp}speculative_eagle_topk=1", f"{mtp}speculative_num_draft_tokens=4",
           f"{mtp}detach_encoder=True", f"{mtp}mtp_loss_scaling_factor=0.1"]  # the demo's RL settings
    return ov + [f"{mtp}adaptive={config == 'adaptive'}"]


def run_ours(paths: dict, shape: str, config: str, steps: int, work: Path) -> dict:
    from rich.console import Console

    from mtprl.config import load_config
    from mtprl.trainer import loop
    from mtprl.trainer.batching import shared_prompt_tokens
    from mtprl.trainer.setup import setup

    overrides = ours_overrides(paths, shape, config) + [f"trainer.default_local_dir={work / 'ckpt' / config}"]
    run = setup(load_config(None, overrides), console=Console(quiet=True))
    tokens: list[dict] = []
    update = loop.actor_update

    def counted(model, optimizer, batch, cfg, generator, dp=None):  # the update's token counts
        rows = shared_prompt_tokens(batch.input_ids, batch.attention_mask, batch.response_mask, batch.group_ids)
        lengths = batch.attention_mask.sum(-1)
        tokens.append({"real": int(lengths.sum()), "unique": len(rows.unique_index) if rows else int(lengths.sum()),
                       "sq_width": int(batch.input_ids.shape[1] ** 2 * len(batch)), "sq_real": int((lengths**2).sum())})
        return update(model, optimizer, batch, cfg, generator, dp)

    loop.actor_update = counted
    rows = []
    try:
        for _ in range(steps):
            t0 = time.perf_counter()
            m = loop.rl_step(run)
            run.step += 1
            rows.append({"step_s": time.perf_counter() - t0, "score": m["critic/score/mean"],
                         "response_length": m["response_length/mean"],
                         "tokens_per_s": m["rollout/tokens_per_s"], "accept_length": m["rollout/spec_accept_length"],
                         "draft_depth": m["rollout/mean_draft_depth"], **tokens[-1],
                         **{k[len("timing_s/"):]: v for k, v in m.items() if k.startswith("timing_s/")}})
        c = run.model.config
        flops = {"mm_params": matmul_params(run.model), "attn_per_sq": 4 * c.num_hidden_layers
                 * c.num_attention_heads * c.resolved_head_dim}  # forward attention FLOPs per (query, key) pair
    finally:
        run.close()
        loop.actor_update = update
    rss = _rss_mb()  # before machine_peaks' 1 GB of buffers
    return {"steps": rows, **flops, **machine_peaks(), "peak_rss_mb": rss}


# ----------------------------------------------------------------------------------------------- TRL
def hf_qwen2(src: str, out: str):
    """Our checkpoint as transformers' Qwen2ForCausalLM (MTP weights ignored), logits checked equal to ours."""
    import torch
    import transformers

    from mtprl.model import from_pretrained

    ours = from_pretrained(src).eval()
    c = ours.config
    ours.save_pretrained(out)
    qc = transformers.Qwen2Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta, tie_word_embeddings=c.tie_word_embeddings)
    hf = transformers.Qwen2ForCausalLM.from_pretrained(out, config=qc, dtype=torch.float32)
    ids = torch.randint(c.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = ours(ids, compute_mtp=False).logits
        diff = float((hf(ids).logits - ref).abs().max() / ref.abs().max())
    if diff > 1e-5:
        raise RuntimeError(f"transformers and mtprl logits differ by {diff:.2e}: the comparison would be meaningless")
    return hf


def run_trl(paths: dict, shape: str, config: str, steps: int, work: Path) -> dict:
    import functools
    import warnings

    import pyarrow.parquet as pq
    import transformers
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from mtprl.data import build_prompt_dataset
    from mtprl.reward.math_dapo import compute_score

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    tmp = tempfile.mkdtemp(dir=work)
    model = hf_qwen2(paths[shape], tmp)
    tok = transformers.AutoTokenizer.from_pretrained(paths[shape], padding_side="left")
    tok.pad_token = tok.pad_token or tok.eos_token
    records = pq.read_table(paths["train"]).slice(0, steps * PROMPTS).to_pylist()
    ours = build_prompt_dataset(paths["train"], tok, max_prompt_length=64).prompts[0].prompt_ids
    theirs = tok.apply_chat_template(records[0]["prompt"], add_generation_prompt=True, tokenize=True)
    theirs = theirs["input_ids"] if isinstance(theirs, dict) or hasattr(theirs, "keys") else theirs
    if list(theirs) != list(ours):
        raise RuntimeError("TRL and mtprl tokenize the first prompt differently: the comparison would be meaningless")
    data = Dataset.from_list([{"prompt": r["prompt"], "ground_truth": r["reward_model"]["ground_truth"]}
                              for r in records])

    def reward(prompts, completions, ground_truth, **_):
        return [compute_score(c[0]["content"] if isinstance(c, list) else c, g)["score"]
                for c, g in zip(completions, ground_truth)]

    times: list[float] = []

    class StepTimer(transformers.TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            times.append(time.perf_counter() - self.t0)

    args = GRPOConfig(
        output_dir=os.path.join(tmp, "out"), per_device_train_batch_size=PROMPTS * N, num_generations=N,
        max_completion_length=SHAPES[shape]["new_tokens"], learning_rate=1e-5, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0,
        optim="adamw_torch", loss_type="dapo", epsilon=0.2, epsilon_high=0.28, beta=0.0, num_iterations=1,
        steps_per_generation=1, temperature=1.0, top_p=1.0, top_k=0, scale_rewards="group", use_cpu=True,
        bf16=config == "trl_bf16", max_steps=steps, logging_steps=1, report_to="none", save_strategy="no",
        shuffle_dataset=False, seed=1, disable_tqdm=True, log_completions=False, dataloader_num_workers=0)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=data, processing_class=tok,
                          callbacks=[StepTimer()])
    phases: dict[str, list[float]] = {}

    def wrap(obj, name, label):
        fn = getattr(obj, name)

        @functools.wraps(fn)
        def timed(*a, **k):
            t0 = time.perf_counter()
            out = fn(*a, **k)
            phases.setdefault(label, []).append(time.perf_counter() - t0)
            return out

        setattr(obj, name, timed)

    wrap(trainer, "_generate", "gen")
    wrap(trainer, "_generate_and_score_completions", "gen_and_score")
    wrap(trainer, "compute_loss", "forward")
    wrap(trainer.accelerator, "backward", "backward")
    trainer.train()
    shutil.rmtree(tmp, ignore_errors=True)
    logs = [h for h in trainer.state.log_history if "reward" in h]
    rows = []
    for i, t in enumerate(times):
        p = {k: v[i] for k, v in phases.items()}
        length = logs[i]["completions/mean_length"]
        rows.append({"step_s": t, "score": logs[i]["reward"], "response_length": length,
                     "tokens_per_s": length * PROMPTS * N / p["gen"], "gen": p["gen"],
                     "reward_adv": p["gen_and_score"] - p["gen"], "forward": p["forward"], "backward": p["backward"],
                     "other": t - p["gen_and_score"] - p["forward"] - p["backward"]})
    return {"steps": rows, "peak_rss_mb": _rss_mb()}


# ----------------------------------------------------------------------------------------------- limits
LIMITS_MODEL = dict(model_type="mimo", vocab_size=512, hidden_size=768, intermediate_size=2304, num_hidden_layers=14,
                    num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=1024,
                    tie_word_embeddings=False, attention_bias=True, num_mtp_layers=1)


def confident_lm(seed: int = 0):
    """A ~100M-parameter fp32 MiMo-style model whose trunk is a CONFIDENT random LM, a stand-in for a trained
    policy: the embedding scaled x1000 dominates the residual stream, so the next token is mostly a function of
    the current one (entropy ~0.2 nats with the head x50). Its one MTP layer is a copy of the first trunk block
    reading only the token embedding (input_proj = [0, I]): it predicts t_{i+2} from t_{i+1} as the trunk
    predicts t_{i+1} from t_i, and drafts well without training (the engine measures the acceptance)."""
    import torch

    from mtprl.model import CausalLM, ModelConfig

    torch.manual_seed(seed)
    model = CausalLM(ModelConfig(**LIMITS_MODEL)).eval()
    h = model.config.hidden_size
    with torch.no_grad():
        model.embed_tokens.weight.mul_(1000.0)
        model.lm_head.weight.mul_(50.0)
        layer = model.mtp_layers[0]
        layer.block.load_state_dict(model.layers[0].state_dict())
        layer.input_proj.weight.zero_()
        layer.input_proj.weight[:, h:] = torch.eye(h)
        layer.final_layernorm.weight.copy_(model.norm.weight)
    return model


def run_limits(new_tokens: int, repeats: int) -> dict:
    """Batch-1 decoding of the ~100M model vs the memory-bandwidth bound, plain / speculative / adaptive."""
    import torch

    from mtprl.rollout import Engine, SamplingParams, SpeculativeConfig

    model = confident_lm()
    weight_bytes = 4 * matmul_params(model)  # every trunk weight and the head read once per plain decode step
    engine = Engine(model, max_num_seqs=1, max_seq_len=16 + new_tokens + 8)
    params = SamplingParams(temperature=1.0, max_new_tokens=new_tokens)
    prompts = torch.randint(model.config.vocab_size, (repeats, 16), generator=torch.Generator().manual_seed(2)).tolist()
    modes = {"plain": None, "speculative": SpeculativeConfig(num_steps=3), "adaptive": SpeculativeConfig(num_steps=3, adaptive=True)}
    engine.generate(prompts[:1], SamplingParams(temperature=1.0, max_new_tokens=8), speculative=modes["speculative"])
    rates: dict[str, list[float]] = {k: [] for k in modes}
    accept: dict[str, list[float]] = {k: [] for k in modes}
    for rep, prompt in enumerate(prompts):  # alternating, one seed per repeat shared by the modes
        for name, spec in modes.items():
            m = engine.generate_with_metrics([prompt], params, speculative=spec,
                                             generator=torch.Generator().manual_seed(rep)).metrics
            rates[name].append(m.tokens_per_s)
            accept[name].append(m.mean_accept_length)
    rss = _rss_mb()
    peaks = machine_peaks()
    bound = peaks["copy_gbps"] * 1e9 / weight_bytes
    return {"params_m": sum(p.numel() for n, p in model.named_parameters() if not n.startswith("mtp_layers")) / 1e6,
            "weight_mb": weight_bytes / 2**20, **peaks, "bound_tokens_per_s": bound,
            **{f"{k}_tokens_per_s": statistics.median(v) for k, v in rates.items()},
            **{f"{k}_accept_length": statistics.mean(v) for k, v in accept.items()}, "peak_rss_mb": rss}


# ----------------------------------------------------------------------------------------------- driver
def check() -> dict:
    """Every configuration's resolved settings and the limits model's size and confidence; nothing run."""
    import torch

    from mtprl.config import load_config
    # the names the workers import when they run, so that a rename in mtprl fails here, not half an hour in
    from mtprl.data import build_math_tokenizer, build_prompt_dataset, load_tokenizer, write_synthetic_math  # noqa: F401
    from mtprl.reward.math_dapo import compute_score  # noqa: F401
    from mtprl.trainer import loop
    from mtprl.trainer.batching import shared_prompt_tokens  # noqa: F401
    from mtprl.trainer.policy import init_policy_checkpoint  # noqa: F401
    from mtprl.trainer.setup import setup  # noqa: F401
    from mtprl.trainer.sft import run_sft  # noqa: F401

    assert callable(loop.rl_step) and callable(loop.actor_update)  # run_ours times the one and wraps the other
    work = Path(tempfile.mkdtemp())
    paths = {"train": str(work / "train.parquet"), "demo": str(work / "demo"), "25m": str(work / "25m")}
    configs = {}
    for shape, spec in SHAPES.items():
        for config in spec["configs"]:
            if config.startswith("trl"):
                continue
            cfg = load_config(None, ours_overrides(paths, shape, config))
            actor, mtp = cfg.actor_rollout_ref.actor, cfg.actor_rollout_ref.model.mtp
            configs[f"{shape}/{config}"] = {
                "prompts": cfg.data.train_batch_size, "n": cfg.actor_rollout_ref.rollout.n,
                "new_tokens": cfg.data.max_response_length, "lr": actor.optim.lr,
                "clip": [actor.clip_ratio_low, actor.clip_ratio_high], "filter_groups": cfg.algorithm.filter_groups.enable,
                "kl_loss": actor.use_kl_loss, "dtype": cfg.actor_rollout_ref.model.dtype,
                "mtp_rollout": mtp.enable_rollout, "mtp_train": mtp.enable_train, "adaptive": mtp.adaptive}
    data = type("Data", (), {"sft_train": str(work / "sft_train.parquet"), "sft_val": str(work / "sft_val.parquet")})
    sft = load_config("tiny_cpu", demo_sft_overrides(work, data, work / "init"))
    mtp, optim = sft.actor_rollout_ref.model.mtp, sft.actor_rollout_ref.actor.optim
    demo_sft = {"batch": sft.data.train_batch_size, "steps": sft.trainer.total_training_steps,
                "new_tokens": sft.data.max_response_length, "lr": optim.lr, "warmup_style": optim.warmup_style,
                "warmup_steps": optim.lr_warmup_steps, "min_lr_ratio": optim.min_lr_ratio,
                "mtp_loss_scaling_factor": mtp.mtp_loss_scaling_factor, "recursive_steps": mtp.recursive_steps}
    model = confident_lm()
    with torch.no_grad():
        ids = torch.randint(model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
        probs = model(ids, compute_mtp=False).logits.softmax(-1)
    shutil.rmtree(work, ignore_errors=True)
    return {"configs": configs, "demo_sft": demo_sft,
            "limits_model": {"trunk_params": sum(p.numel() for n, p in model.named_parameters()
                                                 if not n.startswith("mtp_layers")),
                             "matmul_params": matmul_params(model),
                             "entropy": float(-(probs * probs.clamp_min(1e-30).log()).sum(-1).mean())}}


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    if args.worker == "limits":
        result = run_limits(args.limits_new_tokens, args.limits_repeats)
    else:
        paths = prepare(work)
        steps = args.steps_demo if args.shape == "demo" else args.steps_25m
        fn = run_trl if args.worker.startswith("trl") else run_ours
        result = fn(paths, args.shape, args.worker, steps, work)
    print("RESULT " + json.dumps(result), flush=True)


def spawn(args, worker_name: str, shape: str | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", worker_name, "--work", args.work, "--threads", str(args.threads),
           "--steps-demo", str(args.steps_demo), "--steps-25m", str(args.steps_25m),
           "--limits-new-tokens", str(args.limits_new_tokens),
           "--limits-repeats", str(args.limits_repeats)] + (["--shape", shape] if shape else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false", **(GLIBC_KEEP_FREED if args.malloc_keep else {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{worker_name} {shape or ''} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(lines[-1][len("RESULT "):])


# --malloc-keep (both sides): glibc keeps freed memory instead of returning it to the kernel. By default every
# allocation over 32 MB is a fresh mmap, so each large activation or gradient of the 25M shape's update (a
# [6916, 1536] fp32 tensor is 42 MB) page-faults in every page on first touch: a fresh a * b of that size takes
# 41 ms instead of 17 ms into an existing buffer (10375 minor faults a call). See docs/performance.md.
GLIBC_KEEP_FREED = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**32), "MALLOC_TOP_PAD_": str(2**30)}
OURS_PHASES = ("gen", "reward", "old_log_prob", "adv", "update_actor")
TRL_PHASES = ("gen", "reward_adv", "forward", "backward")


def _median(runs: list[dict], key: str, skip_first: bool = True) -> float:
    return statistics.median(s[key] for r in runs for s in (r["steps"][1:] if skip_first else r["steps"]))


def update_flops(runs: list[dict], peak_key: str = "matmul_gflops") -> dict[str, float]:
    """Median executed / model FLOP/s of our update, and the in-process matmul peak (``peak_key``: fp32 or bf16)."""
    executed, model = [], []
    for r in runs:
        for s in r["steps"][1:]:
            t = s["update_actor"]
            executed.append((6 * r["mm_params"] * s["unique"] + 3 * r["attn_per_sq"] * s["sq_width"]) / t)
            model.append((6 * r["mm_params"] * s["real"] + 3 * r["attn_per_sq"] * s["sq_real"] / 2) / t)
    peak = statistics.median(r[peak_key] for r in runs)
    return {"executed_gflops": statistics.median(executed) / 1e9, "model_gflops": statistics.median(model) / 1e9,
            "matmul_peak_gflops": peak}


def report_shape(shape: str, results: dict[str, list[dict]]) -> dict:
    med = {c: _median(runs, "step_s") for c, runs in results.items()}
    print(f"\n=== {shape}: median seconds per DAPO step ({PROMPTS} prompts x {N}, {SHAPES[shape]['new_tokens']} new "
          f"tokens at most; {len(next(iter(results.values())))} rounds) ===")
    for c, runs in results.items():
        phases = TRL_PHASES if c.startswith("trl") else OURS_PHASES
        parts = {p: _median(runs, p) for p in phases}
        other = med[c] - sum(parts.values())
        line = (f"{c:9s} {med[c]:7.3f} s (warm-up step {statistics.median(r['steps'][0]['step_s'] for r in runs):.2f})"
                + " | " + "  ".join(f"{name} {med[b] / med[c]:.2f}x" for b, name in
                                    (("trl_fp32", "TRL fp32"), ("trl_bf16", "TRL bf16"), ("off", "ours off"))
                                    if b in med and b != c and not (b == "off" and c.startswith("trl")))
                + " | " + " ".join(f"{p} {v:.3f}" for p, v in parts.items()) + f" other {other:.3f}"
                + f" | rollout {_median(runs, 'tokens_per_s'):.0f} tok/s | peak RSS "
                f"{statistics.median(r['peak_rss_mb'] for r in runs):.0f} MB")
        if c in ("on", "adaptive", "on_train"):
            line += (f" | accept length {_median(runs, 'accept_length', False):.2f}, draft depth "
                     f"{_median(runs, 'draft_depth', False):.2f}")
        print(line)
    print("reward (mean score) per step, mean over rounds:")
    curves = {}
    for c, runs in results.items():
        steps = min(len(r["steps"]) for r in runs)
        curves[c] = [statistics.mean(r["steps"][i]["score"] for r in runs) for i in range(steps)]
        print(f"  {c:9s} " + " ".join(f"{x:+.3f}" for x in curves[c]))
    flops = {}
    for c, kind, key in (("off", "fp32", "matmul_gflops"), ("off_bf16", "bf16", "matmul_bf16_gflops")):
        if c not in results:
            continue
        f = flops[c] = update_flops(results[c], key)
        print(f"our update ({c}): executed {f['executed_gflops']:.1f} GFLOP/s = "
              f"{f['executed_gflops'] / f['matmul_peak_gflops']:.0%} of the in-process 2048^3 {kind} matmul peak "
              f"{f['matmul_peak_gflops']:.1f} GFLOP/s; model FLOP/s (every sample's tokens as if alone) "
              f"{f['model_gflops']:.1f} ({f['model_gflops'] / f['matmul_peak_gflops']:.0%})")
    return {"median_step_s": med, "reward_curves": curves, "update": flops}


def report_limits(lim: dict) -> None:
    b = lim["bound_tokens_per_s"]
    print(f"\n=== limits: batch-1 decode, {lim['params_m']:.0f}M-parameter fp32 model ({lim['weight_mb']:.0f} MB of "
          f"weights a token), copy bandwidth {lim['copy_gbps']:.1f} GB/s -> bound {b:.1f} tokens/s ===")
    for k in ("plain", "speculative", "adaptive"):
        r = lim[f"{k}_tokens_per_s"]
        print(f"{k:11s} {r:7.1f} tokens/s = {r / b:.0%} of the bound (mean accepted length {lim[f'{k}_accept_length']:.2f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="demo,25m")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default="runs/bench_vs_trl")
    ap.add_argument("--steps-demo", type=int, default=6)
    ap.add_argument("--steps-25m", type=int, default=3)
    ap.add_argument("--configs", default=None, help="comma list: run only these (of each shape's configs)")
    ap.add_argument("--skip-limits", action="store_true")
    ap.add_argument("--limits-only", action="store_true")
    ap.add_argument("--limits-new-tokens", type=int, default=128)
    ap.add_argument("--limits-repeats", type=int, default=5)
    ap.add_argument("--malloc-keep", action="store_true",
                    help="run every worker (both sides) with glibc keeping freed memory (GLIBC_KEEP_FREED)")
    ap.add_argument("--check", action="store_true", help="resolve every configuration and build the limits model, "
                    "print them as JSON, run nothing (no TRL needed)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--shape", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.check:
        print(json.dumps(check()))
        return
    if args.worker:
        return worker(args)
    import torch

    torch.set_num_threads(args.threads)  # the set-up (the demo-shape SFT run) too
    Path(args.work).mkdir(parents=True, exist_ok=True)
    prepare(Path(args.work))
    summary: dict = {"threads": args.threads, "rounds": args.rounds, "malloc_keep": args.malloc_keep}
    for shape in [] if args.limits_only else args.shapes.split(","):
        configs = [c for c in SHAPES[shape]["configs"] if args.configs is None or c in args.configs.split(",")]
        results: dict[str, list[dict]] = {c: [] for c in configs}
        for r in range(args.rounds):
            for c in configs[r % len(configs):] + configs[: r % len(configs)]:  # the order rotates every round
                results[c].append(spawn(args, c, shape))
                print(f"[{shape} round {r + 1}] {c}: steps " + " ".join(f"{s['step_s']:.2f}" for s in results[c][-1]["steps"]),
                      flush=True)
        summary[shape] = {"report": report_shape(shape, results), "runs": results}
    if not args.skip_limits:
        summary["limits"] = spawn(args, "limits")
        report_limits(summary["limits"])
    out = Path(args.work) / "results.json"
    out.write_text(json.dumps(summary, indent=1))
    print(f"\nall numbers: {out}")


if __name__ == "__main__":
    main()
