"""ScoringPool: worker processes, per-sample deadlines, a hung worker killed and the pool recreated."""

import textwrap
import time

import pytest

from mtprl.reward import ScoreFnSpec, ScoreRequest, ScoringPool

BEHAVIOUR = """
import os, time

def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    if solution_str == "hang":
        while True:
            time.sleep(0.05)
    if solution_str == "slow":
        time.sleep(0.3)
    if solution_str == "raise":
        raise RuntimeError("boom")
    if solution_str == "die":
        os._exit(3)
    ok = solution_str == ground_truth
    return {"score": 1.0 if ok else 0.0, "acc": ok, "pid": os.getpid()}
"""


@pytest.fixture
def spec(tmp_path):
    path = tmp_path / "behaviour.py"
    path.write_text(textwrap.dedent(BEHAVIOUR))
    return ScoreFnSpec(custom_path=str(path), custom_name="compute_score")


def req(solution, gt="1"):
    return ScoreRequest("custom", solution, gt, None)


def test_hung_worker_is_killed_and_pool_recreated(spec):
    t0 = time.monotonic()
    with ScoringPool(spec, num_workers=2, timeout_s=1.0) as pool:
        first_pids = set()
        out = pool.score([req("1"), req("hang"), req("raise"), req("2"), req("slow", "slow"), req("1")])
        assert [o.status for o in out] == ["ok", "timeout", "error", "ok", "ok", "ok"]
        assert out[0].result["score"] == 1.0 and out[3].result["score"] == 0.0 and out[4].result["acc"]
        assert "boom" in out[2].error and "RuntimeError" in out[2].error
        assert "1.0 s" in out[1].error
        assert pool.num_restarts == 1
        first_pids = {o.result["pid"] for o in out if o.status == "ok"}
        # the recreated pool keeps working, with fresh processes
        again = pool.score([req("1"), req("1")])
        assert [o.status for o in again] == ["ok", "ok"]
        assert pool.num_restarts == 1
        assert first_pids  # pids recorded
    assert time.monotonic() - t0 < 10.0


def test_dying_worker_fails_only_its_sample(spec):
    with ScoringPool(spec, num_workers=2, timeout_s=5.0) as pool:
        # "slow" (0.3 s) is still running when "die" kills its worker: both become suspects and are
        # re-run alone; only "die" crashes again, alone, and is failed.
        out = pool.score([req("slow", "slow"), req("die"), req("1"), req("2")])
        assert out[1].status == "error" and "died" in out[1].error
        assert [o.status for i, o in enumerate(out) if i != 1] == ["ok", "ok", "ok"]
        assert out[0].result["acc"] and out[2].result["acc"] and not out[3].result["acc"]
        assert pool.num_restarts == 2


def test_in_process_mode_catches_errors_and_times_out_with_a_thread(spec):
    pool = ScoringPool(spec, num_workers=0, timeout_s=0.5)
    t0 = time.monotonic()
    out = pool.score([req("1"), req("raise"), req("hang"), req("2")])
    assert [o.status for o in out] == ["ok", "error", "timeout", "ok"]
    assert "thread left running" in out[2].error
    assert time.monotonic() - t0 < 3.0
    # no timeout: called directly
    direct = ScoringPool(spec, num_workers=0, timeout_s=None).score([req("1"), req("raise")])
    assert [o.status for o in direct] == ["ok", "error"]


@pytest.mark.parametrize("start_method", ["forkserver", "spawn"])
def test_builtin_scorer_in_workers(start_method):
    with ScoringPool(ScoreFnSpec(), num_workers=1, timeout_s=5.0, start_method=start_method) as pool:
        out = pool.score([ScoreRequest("math_dapo", "Answer: 56", "56"), ScoreRequest("math_dapo", "Answer: 5", "56")])
    assert [o.result["score"] for o in out] == [1.0, -1.0]


def test_bad_settings_and_closed_pool(spec):
    with pytest.raises(ValueError, match="num_workers"):
        ScoringPool(spec, num_workers=-1)
    with pytest.raises(ValueError, match="timeout_s"):
        ScoringPool(spec, timeout_s=0)
    with pytest.raises(ValueError, match="fork"):
        ScoringPool(spec, start_method="fork")
    pool = ScoringPool(spec, num_workers=1, timeout_s=2.0)
    pool.close()
    pool.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        pool.score([req("1")])


def test_worker_that_cannot_load_the_function_fails_at_start(tmp_path):
    path = tmp_path / "gone.py"
    path.write_text("def compute_score(**kw):\n    return 0.0\n")
    spec = ScoreFnSpec(custom_path=str(path))
    path.unlink()  # the workers will not find it
    with pytest.raises(RuntimeError, match="could not start 1 reward worker"):
        ScoringPool(spec, num_workers=1, timeout_s=2.0)


CRASHING = """
import ctypes, os, signal

def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    if solution_str == "exit":
        os._exit(3)
    if solution_str == "segv":
        os.kill(os.getpid(), signal.SIGSEGV)
    if solution_str == "null":
        ctypes.string_at(0)  # reads address 0: a real segmentation fault
    return float(solution_str == ground_truth)
"""


@pytest.mark.parametrize("crash", ["exit", "segv", "null"])
def test_reward_function_that_kills_its_worker_fails_that_sample_and_the_run_goes_on(tmp_path, crash):
    from mtprl.reward.registry import RewardInput, build_reward_manager

    path = tmp_path / "crashing.py"
    path.write_text(textwrap.dedent(CRASHING))
    rm = build_reward_manager("naive", custom_reward_path=str(path), num_workers=2, timeout_s=5.0,
                              failure_score=-0.5)

    def batch(*responses):
        return [RewardInput(data_source="custom", response=r, ground_truth="1") for r in responses]

    with rm:
        out = rm(batch("1", crash, "0", "1"))
        assert out.scores == [1.0, -0.5, 0.0, 1.0]
        assert out.extra["reward_status"] == ["ok", "error", "ok", "ok"]
        assert "died" in out.extra["reward_error"][1]
        assert out.metrics["reward/num_failed"] == 1.0 and out.metrics["reward/num_timeout"] == 0.0
        assert out.metrics["reward/num_pool_restarts"] >= 1.0
        again = rm(batch("1", "0"))  # the next batch is scored normally by the recreated pool
        assert again.scores == [1.0, 0.0] and again.metrics["reward/num_failed"] == 0.0
        assert again.metrics["reward/num_pool_restarts"] == 0.0


def test_a_worker_killed_while_idle_does_not_stop_the_next_batch(spec):
    import os
    import signal
    from concurrent.futures.process import BrokenProcessPool

    with ScoringPool(spec, num_workers=2, timeout_s=5.0) as pool:
        pid = pool.score([req("1")])[0].result["pid"]
        os.kill(pid, signal.SIGKILL)  # e.g. the OOM killer, between two batches
        for _ in range(200):  # until the executor has noticed: it then refuses new work
            try:
                pool._executor.submit(time.sleep, 0).result(timeout=5)
            except BrokenProcessPool:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the executor never noticed its dead worker")
        out = pool.score([req("1"), req("2"), req("1")])
        assert [o.status for o in out] == ["ok", "ok", "ok"] and pid not in {o.result["pid"] for o in out}
        assert pool.num_restarts == 1


def test_in_process_batch_thread_times_out_each_hung_sample_and_scores_the_rest(spec):
    """One thread scores the whole batch; every hung sample is a timeout on its own deadline and a new thread
    takes the samples after it (the in-order results around two hangs are all there)."""
    pool = ScoringPool(spec, num_workers=0, timeout_s=0.3)
    out = pool.score([req("hang"), req("1"), req("raise"), req("hang"), req("2"), req("1")])
    assert [o.status for o in out] == ["timeout", "ok", "error", "timeout", "ok", "ok"]
    assert out[1].result["acc"] and not out[4].result["acc"] and out[5].result["acc"]
    many = pool.score([req(str(i % 3)) for i in range(200)])
    assert [o.status for o in many] == ["ok"] * 200
