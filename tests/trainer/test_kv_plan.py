"""The rollout KV cache is sized to the memory it may take (actor_rollout_ref.rollout.gpu_memory_utilization on
CUDA, cpu_kv_cache_gb on the CPU), not to max_num_seqs x max_seq_len whatever that costs."""

import io
from pathlib import Path

import pytest
import torch
from rich.console import Console

from mtprl.config import ConfigError, load_config
from mtprl.model import CausalLM, ModelConfig, tiny_config
from mtprl.rollout import Engine, SamplingParams
from mtprl.rollout.build import build_engine, plan_kv_cache
from mtprl.trainer.samples import speculative_config
from tests.trainer.test_fake_cuda import fake_cuda  # noqa: F401 (a fixture)

GiB = 2 ** 30
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
PATHS = [f"data.train_files={FIXTURES / 'dapo_math_17k_layout_sample.parquet'}",
         f"data.val_files={FIXTURES / 'aime_2024_layout_sample.parquet'}", "actor_rollout_ref.model.path=/tmp/none",
         "actor_rollout_ref.model.dtype=bfloat16"]  # (as examples/mtp_trainer/run_dapo_mimo_7b_with_mtp.sh)
# MiMo-7B-RL's config.json: qwen2-style trunk, 36 layers, GQA 32 / 8 heads of 128, one MTP layer
MIMO_7B = ModelConfig(model_type="mimo", vocab_size=151680, hidden_size=4096, intermediate_size=11008,
                      num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
                      rope_theta=640000.0, max_position_embeddings=32768, attention_bias=True, num_mtp_layers=1)


def test_dapo_mimo_7b_preset_plan_fits_the_gpu_share():
    """Hand-computed: K+V of one slot = 2 x (36 + 1 MTP) layers x 8 heads x 128 x 2 bytes = 151552 B; a row is
    2048 + 8192 tokens + 3 + 4 tree nodes = 10247 slots, and beside them 16 B a slot of token ids and logprobs
    (163952 B), the draft logits and MTP hidden state (151680 + 4096) x 2 B = 311552 B and the step's temporaries
    for 4 scored nodes, 4 x 151680 x (2 + 12) B = 8494080 B: 8969584 B; 0.8 of 120 GiB free -> floor(0.8 x 120 GiB
    / (10247 x 151552 + 8969584 B)) = 65 rows (not the 1024 of max_num_seqs, which would be 1.45 TiB). (The preset
    itself asks for 16 rows, the sequences a rank has: docs/distributed.md section 3; here the schema's 1024 shows
    the bound.)"""
    assert load_config("dapo_mimo_7b", PATHS).actor_rollout_ref.rollout.max_num_seqs == 16
    cfg = load_config("dapo_mimo_7b", PATHS + ["actor_rollout_ref.rollout.max_num_seqs=1024"])
    r = cfg.actor_rollout_ref.rollout
    assert (r.max_num_seqs, r.gpu_memory_utilization) == (1024, 0.8)
    spec = speculative_config(cfg)
    plan = plan_kv_cache(MIMO_7B, r, 10240, "cuda", dtype=torch.bfloat16, free_bytes=120 * GiB, speculative=spec)
    assert (plan.bytes_per_slot, plan.slots, plan.row_bytes) == (151552, 10247, 163952 + 311552 + 8494080)
    assert plan.rows == int(0.8 * 120 * GiB) // (10247 * 151552 + 8969584) == 65
    assert plan.tokens == 65 * 10247 and plan.bytes == 65 * (10247 * 151552 + 8969584) <= 0.8 * 120 * GiB
    assert 1024 * 10247 * 151552 > 1.4 * 2 ** 40  # what the old sizing planned
    assert plan.describe() == "KV cache: 65 rows x 10247 slots = 666055 tokens, 94.55 GiB of 96.00 GiB allowed"
    with torch.device("meta"):  # the caches the engine allocates for that plan: exactly plan.bytes
        model = CausalLM(MIMO_7B).to(torch.bfloat16)
    engine = Engine(model, max_num_seqs=r.max_num_seqs, max_seq_len=10240, kv_cache_bytes=plan.limit_bytes)
    assert engine.cache_plan(spec) == plan
    caches = (model.new_kv_cache(plan.rows, plan.slots), model.new_mtp_kv_cache(plan.rows, plan.slots))
    assert sum(t.numel() * t.element_size() for c in caches for t in (c.k, c.v)) == plan.tokens * plan.bytes_per_slot
    # without speculation the MTP layer's cache and SpecRows are not allocated: 36 layers, 10242 slots, one
    # scored position a row
    assert plan_kv_cache(MIMO_7B, r, 10240, "cuda", dtype=torch.bfloat16, free_bytes=120 * GiB).rows == \
        int(0.8 * 120 * GiB) // (10242 * 147456 + 16 * 10242 + 151680 * 14)
    # what the engine and the trainer will still allocate is reserved first: a 14 GiB packed copy leaves 82 GiB
    assert plan_kv_cache(MIMO_7B, r, 10240, "cuda", dtype=torch.bfloat16, free_bytes=120 * GiB, speculative=spec,
                         reserve_bytes=14 * GiB).rows == (int(0.8 * 120 * GiB) - 14 * GiB) // (10247 * 151552 + 8969584)


def test_not_one_row_fits_names_the_key():
    cfg = load_config("dapo_mimo_7b", PATHS)
    r, spec = cfg.actor_rollout_ref.rollout, speculative_config(cfg)
    with pytest.raises(ConfigError, match=r"gpu_memory_utilization=0.8 of 1.50 GiB free, less 0.00 GiB the engine's "
                                          r"packed weights and the optimizer will take: one KV cache row of 10247 "
                                          r"slots \(1.455 GiB\)"):
        plan_kv_cache(MIMO_7B, r, 10240, "cuda", dtype=torch.bfloat16, free_bytes=int(1.5 * GiB), speculative=spec)
    cfg = load_config("dapo_mimo_7b", PATHS + ["actor_rollout_ref.rollout.cpu_kv_cache_gb=1"])
    with pytest.raises(ConfigError, match=r"cpu_kv_cache_gb=1.0.*data.max_prompt_length \+ data.max_response_length"):
        plan_kv_cache(MIMO_7B, cfg.actor_rollout_ref.rollout, 10240, "cpu", dtype=torch.bfloat16, speculative=spec)
    with pytest.raises(ConfigError, match="cpu_kv_cache_gb=0"):
        load_config("dapo_mimo_7b", PATHS + ["actor_rollout_ref.rollout.cpu_kv_cache_gb=0"])


def test_build_engine_on_cpu_keeps_the_rows_that_fit_and_generates_everything():
    """cpu_kv_cache_gb for 3 rows (max_num_seqs 8): one line on the console, and 4 prompts x 2 samples come out
    as an unbounded engine gives them (greedy), through 3 rows."""
    torch.manual_seed(0)
    model = CausalLM(tiny_config()).eval()  # K+V per slot: 2 x 2 layers x 2 heads x 8 x 4 bytes = 256 B
    slots = 16 + 8 + 2
    row = slots * 256 + 16 * slots + 128 * (4 + 12)  # + token ids and logprobs, one scored position's temporaries
    gb = 3.5 * row / GiB
    cfg = load_config(None, PATHS[:3] + ["data.max_prompt_length=16", "data.max_response_length=8",
                                         "actor_rollout_ref.rollout.max_num_seqs=8",
                                         f"actor_rollout_ref.rollout.cpu_kv_cache_gb={gb!r}"])
    out = io.StringIO()
    engine = build_engine(cfg, model, console=Console(file=out, width=200))
    plan = engine.cache_plan()
    assert (plan.rows, plan.slots, plan.bytes) == (3, slots, 3 * row) == (3, 26, 27360)
    # prefill forwards bounded by the key (chunked prefill, the default); adaptive MTP catch-ups always
    assert engine.max_num_batched_tokens == engine.catch_up_tokens == cfg.actor_rollout_ref.rollout.max_num_batched_tokens
    off = build_engine(load_config(None, PATHS[:3] + ["data.max_prompt_length=16", "data.max_response_length=8",
                                                       "actor_rollout_ref.rollout.enable_chunked_prefill=False"]),
                       model, console=Console(file=io.StringIO()))
    assert (off.max_num_batched_tokens, off.catch_up_tokens) == (1024 * 24, 8192)  # max_num_seqs x max_seq_len
    assert out.getvalue().strip() == ("rollout: KV cache: 3 rows x 26 slots = 78 tokens, 26.72 KiB of 31.17 KiB "
                                      "allowed (actor_rollout_ref.rollout.max_num_seqs=8)")
    prompts, params = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]], SamplingParams(temperature=0.0, max_new_tokens=8, n=2)
    got = engine.generate_with_metrics(prompts, params)
    want = Engine(model, max_num_seqs=8, max_seq_len=24).generate_with_metrics(prompts, params)
    assert [c.token_ids for c in got.completions] == [c.token_ids for c in want.completions]
    assert len(got.completions) == 8 and got.metrics.num_decode_steps > want.metrics.num_decode_steps


def test_build_engine_on_cuda_decodes_in_the_compute_dtype_and_plans_again_at_each_allocation(monkeypatch, fake_cuda):
    """On a (fake) CUDA device, MiMo-7B shapes with fp32 weights: the engine computes in bf16 (model.dtype), and
    its cache bound is free memory (measured after emptying the caching allocator) x gpu_memory_utilization, less
    its bf16 packed copy and the optimizer moments not yet allocated - measured again at every allocation from
    nothing (after free_cache_engine released the cache, what the update left free counts)."""
    from mtprl.rollout.build import packed_copy_bytes
    from tests.trainer.test_fake_cuda import _to_device

    calls, free = [], [60 * GiB]
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (calls.append("info") or free[0], 80 * GiB))
    cfg = load_config("dapo_mimo_7b", PATHS + ["actor_rollout_ref.rollout.max_num_seqs=1024"])
    pending = [8 * GiB]  # AdamW's moments (8 B a parameter) of a 1e9-parameter shard, before the first step
    with torch.device("meta"):
        model = CausalLM(MIMO_7B)
    model = _to_device(model, fake_cuda)
    engine = build_engine(cfg, model, console=Console(file=io.StringIO()), pending_bytes=lambda: pending[0])
    assert engine.dtype == torch.bfloat16 and next(model.parameters()).dtype == torch.float32
    assert calls == ["empty", "info"]  # emptied before measuring
    packed = packed_copy_bytes(MIMO_7B, torch.bfloat16)
    assert 14 * GiB < packed < 16 * GiB  # ~7.8e9 packed values (embedding and head included) x 2 B
    per_row = 10247 * 151552 + 8969584  # (test_dapo_mimo_7b_preset_plan_fits_the_gpu_share)
    assert engine.kv_cache_bytes == int(0.8 * 60 * GiB) - packed - pending[0]
    assert engine.cache_plan(speculative_config(cfg)).rows == engine.kv_cache_bytes // per_row
    # after the first optimizer step nothing is pending, and the update left 70 GiB free: the next allocation
    # (after release) plans with those
    free[0], pending[0] = 70 * GiB, 0
    engine.release()
    assert engine.kv_budget() == int(0.8 * 70 * GiB) - packed
    assert calls == ["empty", "info"] * 2
