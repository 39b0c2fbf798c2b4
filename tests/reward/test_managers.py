"""Reward managers naive / dapo: scores, extra fields, overlong shaping, failures, name errors."""

import textwrap
import time

import pytest

from mtprl.reward import (
    DAPORewardManager,
    NaiveRewardManager,
    OverlongBufferConfig,
    RewardInput,
    build_reward_manager,
    get_reward_manager_cls,
)


def inp(response, gt="56", length=5, source="math_dapo"):
    return RewardInput(response=response, ground_truth=gt, data_source=source, response_length=length)


def test_naive_scores_and_extra_fields():
    with build_reward_manager("naive") as rm:
        out = rm([inp("Answer: 56"), inp("Answer: 55"), inp("\\boxed{56}", source="aime_2024"), inp("hm")])
    assert out.scores == [1.0, -1.0, 1.0, -1.0]
    assert out.extra["acc"] == [True, False, True, False]
    assert out.extra["pred"] == ["56", "55", "56", "[INVALID]"]
    assert out.extra["reward_status"] == ["ok"] * 4
    assert out.metrics["reward/num_failed"] == 0.0 and out.metrics["reward/num_timeout"] == 0.0


def test_synthetic_source_is_graded_and_unknown_source_is_a_clear_error():
    with NaiveRewardManager() as rm:
        assert rm([inp("3+5 = 8\nAnswer: 8", gt="8", source="synthetic_arith")]).scores == [1.0]
        with pytest.raises(ValueError) as e:
            rm([inp("Answer: 56", source="openai/gsm8k")])
    msg = str(e.value)
    assert "openai/gsm8k" in msg and "math_dapo" in msg and "custom_reward_function.path" in msg


def test_dapo_overlong_shaping_and_log():
    # L_max = 20, B = 4, α = 1: lengths 10 -> 0, 18 -> -0.5, 20 -> -1
    cfg = OverlongBufferConfig(enable=True, len=4, penalty_factor=1.0, log=True)
    with build_reward_manager("dapo", max_resp_len=20, overlong_buffer_cfg=cfg) as rm:
        out = rm([inp("Answer: 56", length=10), inp("Answer: 56", length=18), inp("Answer: 1", length=20)])
    assert out.scores == pytest.approx([1.0, 0.5, -2.0])
    assert out.raw_scores == [1.0, 1.0, -1.0]  # the scorer's own, before the shaping (verl's extra "score")
    assert out.extra["overlong_reward"] == pytest.approx([0.0, -0.5, -1.0])
    assert out.extra["overlong"] == [False, True, True]
    assert out.extra["acc"] == [True, True, False]  # acc is the scorer's, before shaping
    assert out.metrics["reward/overlong_reward/mean"] == pytest.approx(-0.5)
    assert out.metrics["reward/overlong/mean"] == pytest.approx(2 / 3)


def test_dapo_without_log_or_disabled():
    cfg = {"enable": True, "len": 4, "penalty_factor": 2.0, "log": False}  # a dict works too
    with DAPORewardManager(max_resp_len=20, overlong_buffer_cfg=cfg) as rm:
        out = rm([inp("Answer: 56", length=19)])  # 1 - 3/4·2 = -0.5
    assert out.scores == pytest.approx([-0.5])
    assert "overlong_reward" not in out.extra and "reward/overlong/mean" not in out.metrics
    with DAPORewardManager() as rm:  # shaping off: plain scores, no max_resp_len needed
        assert rm([inp("Answer: 56", length=10_000)]).scores == [1.0]


def test_dapo_config_errors():
    with pytest.raises(ValueError, match="max_resp_len"):
        DAPORewardManager(overlong_buffer_cfg=OverlongBufferConfig(enable=True, len=4))
    with pytest.raises(ValueError, match="must be <= max_resp_len"):
        DAPORewardManager(max_resp_len=8, overlong_buffer_cfg=OverlongBufferConfig(enable=True, len=16))
    with pytest.raises(ValueError, match="needs reward_model.reward_manager=dapo"):
        build_reward_manager("naive", overlong_buffer_cfg={"enable": True, "len": 4}, max_resp_len=20)
    with DAPORewardManager(max_resp_len=20, overlong_buffer_cfg=OverlongBufferConfig(enable=True, len=4)) as rm:
        with pytest.raises(ValueError, match="response_length"):
            rm([RewardInput("Answer: 1", "1", "math_dapo", response_length=None)])


def test_unknown_manager_names_closest():
    with pytest.raises(ValueError, match="did you mean 'dapo'"):
        get_reward_manager_cls("dapoo")
    with pytest.raises(ValueError, match="did you mean 'naive'"):
        build_reward_manager("naiv")


CUSTOM = """
import time

def my_reward(data_source, solution_str, ground_truth, extra_info=None, scale=1.0):
    if solution_str == "hang":
        while True:
            time.sleep(0.05)
    if solution_str == "raise":
        raise ValueError("cannot parse")
    if solution_str == "nan":
        return float("nan")
    if solution_str == "nodict":
        return {"acc": True}
    return scale * float(solution_str == ground_truth)
"""


@pytest.fixture
def custom_file(tmp_path):
    path = tmp_path / "reward_fn.py"
    path.write_text(textwrap.dedent(CUSTOM))
    return path


@pytest.mark.parametrize("num_workers", [0, 2])
def test_custom_function_failures_get_failure_score_and_are_counted(custom_file, num_workers):
    t0 = time.monotonic()
    rm = build_reward_manager(
        "dapo",
        custom_reward_path=str(custom_file),
        custom_reward_name="my_reward",
        reward_fn_kwargs={"scale": 2.0},
        num_workers=num_workers,
        timeout_s=1.0,
        failure_score=-1.0,
    )
    with rm:
        batch = [inp(s, gt="7", source="anything") for s in ["7", "raise", "hang", "nan", "nodict", "8"]]
        out = rm(batch)
    # float results: score = scale·match, acc = the score itself
    assert out.scores == [2.0, -1.0, -1.0, -1.0, -1.0, 0.0]
    assert out.extra["acc"] == [2.0, False, False, False, False, 0.0]
    assert out.extra["reward_status"] == ["ok", "error", "timeout", "error", "error", "ok"]
    assert "cannot parse" in out.extra["reward_error"][1]
    assert "finite number" in out.extra["reward_error"][3] and "without 'score'" in out.extra["reward_error"][4]
    assert out.metrics["reward/num_failed"] == 3.0
    assert out.metrics["reward/num_timeout"] == 1.0
    assert out.metrics["reward/num_pool_restarts"] == (1.0 if num_workers else 0.0)
    assert time.monotonic() - t0 < 10.0


def test_custom_function_errors_at_start_up(custom_file, tmp_path):
    with pytest.raises(ValueError, match="no function 'compute_score'.*Did you mean 'my_reward'"):
        NaiveRewardManager(custom_reward_path=str(custom_file))
    with pytest.raises(ValueError, match="does not exist"):
        NaiveRewardManager(custom_reward_path=str(tmp_path / "missing.py"))
    with pytest.raises(ValueError, match="cannot be called"):
        NaiveRewardManager(custom_reward_path=str(custom_file), custom_reward_name="my_reward",
                           reward_fn_kwargs={"unknown_kw": 1})
    with pytest.raises(ValueError, match="use_math_verify"):
        NaiveRewardManager(custom_reward_path=str(custom_file), custom_reward_name="my_reward", use_math_verify=True)
    with pytest.raises(ValueError, match="failure_score"):
        NaiveRewardManager(failure_score=float("nan"))


def test_math_verify_option_through_the_manager():
    with NaiveRewardManager(use_math_verify=True, num_workers=1, timeout_s=20.0) as rm:
        out = rm([inp("Answer: 0.5", gt="\\frac{1}{2}"), inp("Answer: 0.4", gt="\\frac{1}{2}")])
    assert out.scores == [1.0, -1.0]
