"""collect_step_samples with a scripted engine: dynamic sampling as verl's RayDAPOTrainer (singleton groups,
the filter metric) and the step metrics over every generation batch."""

from types import SimpleNamespace

import pytest

from mtprl.config import load_config
from mtprl.data.dataset import TokenizedPrompt
from mtprl.data.schema import PromptRecord
from mtprl.reward import build_reward_manager
from mtprl.rollout.types import Completion, GenerateOutput, RolloutMetrics
from mtprl.trainer.samples import collect_step_samples, counter, filter_metric_values

# score +1 for a response starting with "a", else -1; a response containing "z" makes the scorer raise
REWARD = '''
def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    if "z" in solution_str:
        raise RuntimeError("unparseable")
    good = solution_str.startswith("a")
    return {"score": 1.0 if good else -1.0, "acc": good}
'''
EOS = 0


class Tokenizer:
    eos_token_id = EOS

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i - 1) for i in ids if i != EOS)


class ScriptedEngine:
    """Each generate call answers with the next entry of ``script``: (responses per prompt, RolloutMetrics)."""

    def __init__(self, script):
        self.script = list(script)

    def generate_with_metrics(self, prompt_ids, params, speculative=None, generator=None):
        responses, metrics = self.script.pop(0)
        assert len(responses) == len(prompt_ids)
        completions = [Completion(token_ids=[ord(ch) - ord("a") + 1 for ch in text], logprobs=[0.0] * len(text),
                                  trunk_logprobs=[0.0] * len(text), finish_reason="length", prompt_index=p,
                                  sample_index=j)
                       for p, group in enumerate(responses) for j, text in enumerate(group)]
        return GenerateOutput(completions=completions, metrics=metrics)


def _prompts(k):
    return [TokenizedPrompt(record=PromptRecord(index=i, data_source="custom", messages=({"role": "user", "content": "q"},),
                                                ground_truth="a"), prompt_ids=[1, 2], truncated=False) for i in range(k)]


def _batches(n_prompts, n_batches):
    """next_prompts for the loop: ``n_batches`` batches, then a failure (a test that loops forever fails)."""
    calls = iter(range(n_batches))

    def next_prompts():
        if next(calls, None) is None:
            raise AssertionError("more generation batches than the test scripted")
        return _prompts(n_prompts)

    return next_prompts


@pytest.fixture
def manager(tmp_path):
    path = tmp_path / "reward.py"
    path.write_text(REWARD)
    # L_max = 6, B = 4: a response of 6 tokens gets -1, one of <= 2 tokens nothing
    rm = build_reward_manager("dapo", custom_reward_path=str(path), num_workers=0, max_resp_len=6,
                              overlong_buffer_cfg={"enable": True, "len": 4, "penalty_factor": 1.0, "log": True})
    yield rm
    rm.close()


def _cfg(*extra):
    return load_config(None, ["data.max_response_length=6", "algorithm.filter_groups.enable=True",
                              "actor_rollout_ref.actor.ppo_mini_batch_size=1", *extra])


def _collect(cfg, manager, script, n_prompts, **kw):
    return collect_step_samples(cfg, ScriptedEngine(script), manager, _batches(n_prompts, len(script)), None,
                                Tokenizer(), counter(0), **kw)


def test_rollout_n_1_with_dynamic_sampling_keeps_singleton_groups(manager):
    # GRPO with rollout.n=1: every group has one sample (std 0); verl keeps them (std > 0 or len == 1)
    cfg = _cfg("actor_rollout_ref.rollout.n=1", "data.train_batch_size=2", "algorithm.filter_groups.max_num_gen_batches=3")
    samples, metrics = _collect(cfg, manager, [([["a"], ["a"]], RolloutMetrics(num_sequences=2))], 2)
    assert [s.group_id for s in samples] == [0, 1]
    assert metrics["train/num_gen_batches"] == 1.0


def test_filter_on_score_reads_the_raw_score_not_the_overlong_shaped_one(manager):
    # group 0: "aa" and "aaaaaa" both right: raw [1, 1] (std 0); shaped [1, 1 - 1] = [1, 0] (std > 0)
    # group 1: "aa" right, "bb" wrong: raw [1, -1]
    script = [([["aa", "aaaaaa"], ["aa", "bb"]], RolloutMetrics(num_sequences=4))]
    cfg = _cfg("actor_rollout_ref.rollout.n=2", "data.train_batch_size=1")
    by_score, _ = _collect(cfg, manager, script, 2)
    assert [s.group_id for s in by_score] == [1, 1]  # verl: reward_extra_info["score"] is the scorer's
    assert [s.score for s in by_score] == [1.0, -1.0] and [s.raw_score for s in by_score] == [1.0, -1.0]
    by_seq_reward, _ = _collect(_cfg("actor_rollout_ref.rollout.n=2", "data.train_batch_size=1",
                                     "algorithm.filter_groups.metric=seq_reward"), manager, list(script), 2)
    assert [s.group_id for s in by_seq_reward] == [0, 0]  # Σ token-level scores: the shaped score varies
    assert [s.score for s in by_seq_reward] == [1.0, 0.0] and [s.raw_score for s in by_seq_reward] == [1.0, 1.0]


def test_filter_metric_values_per_metric():
    s = [SimpleNamespace(acc=1.0, raw_score=1.0, score=0.5), SimpleNamespace(acc=0.0, raw_score=-1.0, score=-1.0)]
    assert filter_metric_values(s, "acc") == [1.0, 0.0]
    assert filter_metric_values(s, "score") == [1.0, -1.0]
    assert filter_metric_values(s, "seq_reward") == [0.5, -1.0]
    assert filter_metric_values(s, "seq_final_reward") == [0.5, -1.0]  # no KL in the reward: the shaped score
    assert filter_metric_values(s, "seq_final_reward", lambda xs: [7.0] * len(xs)) == [7.0, 7.0]
    with pytest.raises(ValueError, match="algorithm.filter_groups.metric='pass'"):
        filter_metric_values(s, "pass")


def test_step_metrics_cover_every_generation_batch(manager):
    # batch 1: one group, both responses make the scorer fail (acc False twice: dropped); batch 2: kept
    m1 = RolloutMetrics(num_sequences=2, num_generated_tokens=10, elapsed_s=1.0, num_decode_steps=2, num_row_steps=4,
                        mean_accept_length=2.0, accept_rate_per_depth=[0.5, 0.5], mean_draft_depth=2.0,
                        num_drafts_reached=[4, 2], num_drafts_accepted=[2, 1])
    m2 = RolloutMetrics(num_sequences=2, num_generated_tokens=30, elapsed_s=2.0, num_decode_steps=6, num_row_steps=12,
                        mean_accept_length=2.5, accept_rate_per_depth=[8 / 12, 2 / 8], mean_draft_depth=1.0,
                        num_drafts_reached=[12, 8], num_drafts_accepted=[8, 2])
    script = [([["z", "zzzzzz"]], m1), ([["aaaaaa", "bz"]], m2)]
    cfg = _cfg("actor_rollout_ref.rollout.n=2", "data.train_batch_size=1")
    samples, m = _collect(cfg, manager, script, 1)
    assert [s.group_id for s in samples] == [1, 1]
    assert m["train/num_gen_batches"] == 2.0
    assert m["rollout/num_sequences"] == 4.0 and m["rollout/num_generated_tokens"] == 40.0  # summed
    assert m["rollout/elapsed_s"] == pytest.approx(3.0) and m["rollout/tokens_per_s"] == pytest.approx(40 / 3)
    assert m["rollout/spec_accept_length"] == pytest.approx((2.0 * 4 + 2.5 * 12) / 16)  # per row-step
    assert m["rollout/spec_accept_rate_1"] == pytest.approx(10 / 16)
    assert m["rollout/spec_accept_rate_2"] == pytest.approx(3 / 10)
    assert m["rollout/mean_draft_depth"] == pytest.approx((2.0 * 2 + 1.0 * 6) / 8)
    assert m["reward/num_failed"] == 3.0  # 2 + 1, not the last batch's 1
    assert m["reward/overlong/mean"] == pytest.approx(2 / 4)  # "zzzzzz" and "aaaaaa" of the 4 responses
    assert m["reward/overlong_reward/mean"] == pytest.approx(-2 / 4)
