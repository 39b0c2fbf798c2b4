"""Rollout throughput: our engine vs transformers' generate, and our speculative vs plain decoding.

    .venv/bin/python benchmarks/rollout.py [--shape deep|wide] [--repeats 3] [--train-seconds 45] [--threads 1]
                                           [--new-tokens 256] [--batches 1,16,64] [--num-steps 4] [--temperature 1.0]

What it does, in one process:
 1. Builds a small MiMo-style model (qwen2 trunk + 1 MTP layer; SHAPES) whose trunk is a CONFIDENT random LM:
    random weights with the embedding and the output head scaled up, so that its next-token entropy on its own
    samples is ~0.4 nats (printed) - a stand-in for a trained policy, which at temperature 1 is confident on
    most tokens. Its MTP layer is then TRAINED by distillation (the brief's "simplest honest option"): the
    trunk samples 192 continuations of 128 tokens with our engine, and the MTP layer alone (trunk frozen) is
    fitted for --train-seconds with mtprl.model.mtp_loss(loss_type="kl") to the trunk's own distribution -
    what the RL trainer does to keep MTP in sync with the policy. Acceptance is then what the engine measures.
 2. (a) Plain decoding, ours vs `transformers` (the model saved with save_pretrained and loaded as
    Qwen2ForCausalLM, logits checked equal; the MTP weights are ignored there): same prompts, temperature
    sampling (top_k=0), no stop token, exactly --new-tokens per row, transformers' `generate` with its default
    dynamic KV cache.
    (b) Ours: speculative (chain of --num-steps drafts) and adaptive speculative vs plain.
    (c) Our plain decoding on the packed fast path (the default, mtprl/model/packed.py) vs the model's own
    forward_step (Engine(packed=False), the reference path it is tested against).
    Each configuration runs --repeats times (3x at batch 1), interleaved; we report the median tokens/s (generated tokens /
    wall time of the whole call, prefill included) and ratios of medians.
Prompts: 32 random tokens per row. The machine is shared and noisy: torch runs with --threads threads (1 by
default: 2 cores shared with other jobs); transformers runs under the same setting.
Shapes: "deep" (64 wide, 24 layers) is dominated by per-layer work that hardly grows with the tokens of a step,
the regime of decoding on a GPU (memory bound), where speculation pays; "wide" (256 wide, 8 layers) is compute
bound on this CPU: verifying 4 tokens costs 1.3-2x one token, and speculation pays much less (docs/rollout.md).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from mtprl.model import CausalLM, ModelConfig, mtp_loss
from mtprl.rollout import Engine, SamplingParams, SpeculativeConfig

BASE = dict(model_type="mimo", vocab_size=512, num_attention_heads=4, num_key_value_heads=2, attention_bias=True,
            num_mtp_layers=1, max_position_embeddings=1024, tie_word_embeddings=False)
SHAPES = {  # name: (config fields, embedding scale, head scale)
    "deep": (dict(hidden_size=64, intermediate_size=192, num_hidden_layers=24), 50.0, 100.0),
    "deep36": (dict(hidden_size=64, intermediate_size=192, num_hidden_layers=36), 50.0, 100.0),  # MiMo-7B's depth
    "wide": (dict(hidden_size=256, intermediate_size=768, num_hidden_layers=8), 50.0, 50.0),
}


def build_model(shape: str) -> CausalLM:
    fields, emb_scale, head_scale = SHAPES[shape]
    torch.manual_seed(0)
    model = CausalLM(ModelConfig(**BASE, **fields)).eval()
    with torch.no_grad():
        model.embed_tokens.weight.mul_(emb_scale)
        model.lm_head.weight.mul_(head_scale)
    return model


def _kl(trunk_logits: torch.Tensor, draft_logits: torch.Tensor) -> torch.Tensor:
    ref = trunk_logits.detach().float().log_softmax(-1)
    return (ref.exp() * (ref - draft_logits.float().log_softmax(-1))).sum(-1).mean()


def recursive_loss(model: CausalLM, ids: torch.Tensor, out, levels: int) -> torch.Tensor:
    """EAGLE-style loss for drafts deeper than D = 1: the engine feeds the last MTP layer its OWN output hidden
    state (position j gets h_{j-1} of the previous draft step) with token t_{j+1}, to predict t_{j+2}, the
    token the trunk predicts at j+1. Train that use too (KL to the trunk), for `levels` recursion levels."""
    from mtprl.model.trunk import full_attn_inputs

    b, t = ids.shape
    layer = model.mtp_layers[-1]
    pos = torch.arange(t)[None].expand(b, t)
    cos, sin = model._rope(pos, out.hidden_states.dtype)
    attn = full_attn_inputs(cos, sin, None)
    tok = model.embed_tokens.weight.detach()[torch.cat([ids[:, 1:], ids[:, -1:]], 1)]  # Emb(t_{j+1}) at j
    head = model.head_weight().detach()
    prev, total = out.mtp_hidden_states[-1], 0.0
    for r in range(1, levels + 1):
        prev = torch.cat([torch.zeros_like(prev[:, :1]), prev[:, :-1]], 1)  # h_{j-1} at position j
        prev = layer(prev, tok, attn, len(model.mtp_layers) - 1)
        logits = torch.nn.functional.linear(prev, head)
        total = total + _kl(out.logits[:, r + 1:], logits[:, r:-1])  # positions j >= r have a real h_{j-1}
    return total / levels


def distil_mtp(model: CausalLM, seconds: float, seed: int, levels: int) -> dict[str, float]:
    """Sample the trunk's own continuations, then fit the MTP layer (trunk frozen) to the trunk's distribution,
    at depth 1 (mtp_loss kl) and in its recursive use for deeper drafts (recursive_loss)."""
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(vocab, (192, 4), generator=g).tolist()
    out = Engine(model, max_num_seqs=64, max_seq_len=140).generate(
        prompts, SamplingParams(temperature=1.0, max_new_tokens=124), generator=g)
    seqs = torch.tensor([prompts[c.prompt_index] + c.token_ids for c in out])
    train, test = seqs[:-32], seqs[-32:]
    for p in model.parameters():
        p.requires_grad_(False)
    mtp_params = list(model.mtp_layers.parameters())
    for p in mtp_params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(mtp_params, lr=3e-3, weight_decay=0.0)
    start, steps = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        ids = train[torch.randint(len(train), (16,), generator=g)]
        o = model(ids, mtp_detach_encoder=True, mtp_detach_head=True)
        loss, _ = mtp_loss(o.mtp_logits, ids, torch.ones_like(ids), scaling_factor=1.0, loss_type="kl",
                           trunk_logits=o.logits)
        if levels > 0:
            loss = loss + recursive_loss(model, ids, o, levels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
    for p in mtp_params:
        p.requires_grad_(False)
    with torch.no_grad():  # held-out: trunk entropy and the one-draft acceptance sum_v min(p, q) at temperature 1
        o = model(test)
        p_next = o.logits.softmax(-1)[:, 1:]  # trunk at i+1 predicts t_{i+2}
        q = o.mtp_logits[0].softmax(-1)[:, :-1]  # depth 1 at i predicts t_{i+2}
        lp = o.logits.log_softmax(-1)
        entropy = float(-(lp.exp() * lp).sum(-1).mean())
        accept = float(torch.minimum(p_next, q).sum(-1).mean())
    return {"mtp_train_steps": steps, "trunk_entropy_nats": round(entropy, 3), "heldout_accept_t1": round(accept, 3)}


def run_ours(engine: Engine, prompts, params, spec, seed: int = 0) -> tuple[float, object]:
    out = engine.generate_with_metrics(prompts, params, speculative=spec, generator=torch.Generator().manual_seed(seed))
    return out.metrics.tokens_per_s, out.metrics


def run_hf(hf_model, prompts, new_tokens: int, temperature: float, seed: int = 0) -> float:
    ids = torch.tensor(prompts)
    torch.manual_seed(seed)
    start = time.perf_counter()
    with torch.inference_mode():
        out = hf_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=temperature > 0,
                                temperature=temperature if temperature > 0 else None, top_k=0, top_p=1.0,
                                max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
    elapsed = time.perf_counter() - start
    return (out.shape[1] - ids.shape[1]) * ids.shape[0] / elapsed


def load_hf(model: CausalLM, tmp: str):
    import transformers

    transformers.logging.set_verbosity_error()  # "unexpected keys" = our MTP layers, expected
    model.save_pretrained(tmp)
    cfg = transformers.Qwen2Config(
        vocab_size=model.config.vocab_size, hidden_size=model.config.hidden_size,
        intermediate_size=model.config.intermediate_size, num_hidden_layers=model.config.num_hidden_layers,
        num_attention_heads=model.config.num_attention_heads, num_key_value_heads=model.config.num_key_value_heads,
        max_position_embeddings=model.config.max_position_embeddings, rms_norm_eps=model.config.rms_norm_eps,
        rope_theta=model.config.rope_theta, tie_word_embeddings=False)
    hf = transformers.Qwen2ForCausalLM.from_pretrained(tmp, config=cfg, dtype=torch.float32).eval()
    ids = torch.randint(model.config.vocab_size, (2, 16))
    with torch.no_grad():
        ours = model(ids, compute_mtp=False).logits
        diff = ((hf(ids).logits - ours).abs().max() / ours.abs().max()).item()  # relative to the logit scale
    if diff > 1e-5:
        raise RuntimeError(f"transformers and mtprl logits differ by {diff}: the comparison would be meaningless")
    return hf, diff


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="deep")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--train-seconds", type=float, default=45.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--num-steps", type=int, default=4)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--skip-hf", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = build_model(args.shape)
    info = distil_mtp(model, args.train_seconds, seed=1, levels=args.num_steps - 1)
    print(f"model {args.shape}: {SHAPES[args.shape][0]} vocab {BASE['vocab_size']}\nMTP distilled: {info}")
    batches = [int(b) for b in args.batches.split(",")]
    prompts_all = torch.randint(BASE["vocab_size"], (max(batches), 32), generator=torch.Generator().manual_seed(2)).tolist()
    params = SamplingParams(temperature=args.temperature, max_new_tokens=args.new_tokens)
    spec = SpeculativeConfig(num_steps=args.num_steps)
    adaptive = SpeculativeConfig(num_steps=args.num_steps, adaptive=True)
    hf = None
    if not args.skip_hf:
        with tempfile.TemporaryDirectory() as tmp:
            hf, diff = load_hf(model, tmp)
        print(f"transformers Qwen2ForCausalLM loaded from our save_pretrained; max |logit diff| / max |logit| = {diff:.2e}")
    rows = []
    for b in batches:
        prompts = prompts_all[:b]
        engine = Engine(model, max_num_seqs=b, max_seq_len=32 + args.new_tokens + 8)
        module_engine = Engine(model, max_num_seqs=b, max_seq_len=32 + args.new_tokens + 8, packed=False)
        run_ours(engine, prompts[:1], SamplingParams(temperature=args.temperature, max_new_tokens=8), spec)  # warm-up
        res: dict[str, list[float]] = {"plain": [], "spec": [], "adaptive": [], "hf": [], "module": []}
        metrics = {}
        accept_len: dict[str, list[float]] = {"spec": [], "adaptive": []}
        # one seed per repeat, shared by the configurations. At batch 1 a run is ONE sequence whose acceptance
        # varies by luck (adaptive and fixed draw different paths), so batch 1 gets 3x the repeats.
        repeats = args.repeats * (3 if b == 1 else 1)
        for rep in range(repeats):
            for name, cfg in (("plain", None), ("spec", spec), ("adaptive", adaptive)):
                tps, m = run_ours(engine, prompts, params, cfg, seed=rep)
                res[name].append(tps)
                metrics[name] = m
                if name in accept_len:
                    accept_len[name].append(m.mean_accept_length)
            if hf is not None and b in (1, 16):
                res["hf"].append(run_hf(hf, prompts, args.new_tokens, args.temperature, seed=rep))
            if b in (1, 16):
                res["module"].append(run_ours(module_engine, prompts, params, None, seed=rep)[0])
        med = {k: statistics.median(v) for k, v in res.items() if v}
        best = {k: max(v) for k, v in res.items() if v}
        rows.append((b, med, metrics))
        m_s, m_a = metrics["spec"], metrics["adaptive"]
        line = (f"batch {b:3d}: plain {med['plain']:8.1f} tok/s | spec(K={args.num_steps}) {med['spec']:8.1f} "
                f"({med['spec'] / med['plain']:.2f}x plain) | adaptive {med['adaptive']:8.1f} "
                f"({med['adaptive'] / med['plain']:.2f}x plain, {med['adaptive'] / max(med['plain'], med['spec']):.3f} "
                f"of best fixed; mean depth {m_a.mean_draft_depth:.2f})")
        if "hf" in med:
            line += (f" | transformers {med['hf']:8.1f} tok/s (ours plain {med['plain'] / med['hf']:.2f}x, ours spec "
                     f"{med['spec'] / med['hf']:.2f}x)")
        if "module" in med:
            line += f" | plain on the module path {med['module']:8.1f} tok/s (packed {med['plain'] / med['module']:.2f}x)"
        print(line)
        print(f"           best of runs (interference only slows a run down): plain {best['plain']:.0f}, spec "
              f"{best['spec']:.0f} ({best['spec'] / best['plain']:.2f}x), adaptive {best['adaptive']:.0f} "
              f"({best['adaptive'] / max(best['plain'], best['spec']):.3f} of best fixed)"
              + (f", transformers {best['hf']:.0f} (ours plain {best['plain'] / best['hf']:.2f}x)" if "hf" in best else ""))
        print(f"           accept length spec {statistics.mean(accept_len['spec']):.2f} adaptive "
              f"{statistics.mean(accept_len['adaptive']):.2f} (means over repeats), per-depth acceptance (last spec run) "
              f"{[round(a, 3) for a in m_s.accept_rate_per_depth]}; all runs: "
              + ", ".join(f"{k}={[round(x) for x in v]}" for k, v in res.items() if v))


if __name__ == "__main__":
    main()
