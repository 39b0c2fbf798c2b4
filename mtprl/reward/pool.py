"""Scoring responses in worker processes with a per-sample deadline that never hangs the trainer.

A reward function is user code (or math-verify / sympy on model output) and may raise, loop forever
or crash its process. ``ScoringPool.score`` turns every such event into a per-sample outcome and
returns for the whole batch:

  * ``num_workers > 0``: a ``concurrent.futures.ProcessPoolExecutor`` with the ``forkserver`` start
    method (``spawn`` where forkserver is missing; never ``fork``, which is unsafe once torch has
    started threads). At most ``num_workers`` samples are in flight, so a sample's deadline starts
    when a worker takes it. When a deadline passes, the pool's processes are killed, the pool is
    recreated and the other in-flight samples are re-submitted. A worker that dies (segfault,
    ``os._exit``) breaks the pool: its in-flight samples are re-submitted, each run alone, and the
    one whose worker dies while it runs alone is failed. A worker that dies while idle (between
    batches) only makes the next batch start on a recreated pool; one that dies while idle during a
    batch is blamed on the samples then in flight like a crash (one alone in flight is failed).
  * ``num_workers = 0``: in the calling process. Exceptions are caught the same way. With a timeout,
    the batch runs in one daemon thread, each sample with its own deadline; a thread cannot be killed, so
    a hung call keeps running (and holding a share of the GIL) in the background until it returns or the
    process exits, and a new thread scores the rest. Use worker processes when functions may hang.

The worker side resolves a picklable ``ScoreFnSpec`` (built-in data-source dispatch, or a custom
file + function name) once per process. The pool is a context manager; ``close()`` stops the workers.
"""

from __future__ import annotations

import functools
import math
import multiprocessing
import os
import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

__all__ = ["ScoreFnSpec", "ScoreOutcome", "ScoreRequest", "ScoringPool", "resolve_score_fn"]

Status = Literal["ok", "error", "timeout"]


@dataclass(frozen=True)
class ScoreFnSpec:
    """Picklable description of the reward function, resolved inside each worker.

    custom_path / custom_name: a user file and function (None = built-in ``default_compute_score``).
    use_math_verify: built-in scorer only; adds the math-verify equivalence fallback.
    kwargs: extra keyword arguments for every call, as (name, value) pairs.
    """

    custom_path: str | None = None
    custom_name: str = "compute_score"
    use_math_verify: bool = False
    kwargs: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class ScoreRequest:
    """One sample to grade: the call's keyword arguments."""

    data_source: str
    solution_str: str
    ground_truth: Any
    extra_info: dict | None = None


@dataclass
class ScoreOutcome:
    """What happened to one sample: the raw return value when ``status == "ok"``, else an error text."""

    status: Status
    result: Any = None
    error: str = ""


@functools.lru_cache(maxsize=8)
def resolve_score_fn(spec: ScoreFnSpec) -> Callable[..., Any]:
    """The callable described by ``spec`` (cached per process; the file is imported once)."""
    kwargs = dict(spec.kwargs)
    if spec.custom_path is None:
        from mtprl.reward.scorers import default_compute_score

        if spec.use_math_verify:
            import math_verify  # noqa: F401  (import sympy now, not inside the first deadline)
        return functools.partial(default_compute_score, use_math_verify=spec.use_math_verify, **kwargs)
    from mtprl.reward.custom import load_custom_reward_fn

    fn = load_custom_reward_fn(spec.custom_path, spec.custom_name, **kwargs)
    return functools.partial(fn, **kwargs) if kwargs else fn


def _score_one(spec: ScoreFnSpec, request: ScoreRequest) -> Any:
    fn = resolve_score_fn(spec)
    return fn(
        data_source=request.data_source,
        solution_str=request.solution_str,
        ground_truth=request.ground_truth,
        extra_info=request.extra_info,
    )


def _init_worker(spec: ScoreFnSpec) -> None:
    resolve_score_fn(spec)


def _ping(delay_s: float) -> int:
    time.sleep(delay_s)
    return os.getpid()


def _default_start_method() -> str:
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


@dataclass
class _Flight:
    index: int
    deadline: float


@dataclass
class ScoringPool:
    """Grades ``ScoreRequest`` batches with ``spec``'s function (module docstring).

    num_workers: worker processes (0 = in the calling process). timeout_s: per-sample deadline in
    seconds (None = no deadline). start_method: "forkserver" (default where available) or "spawn".
    startup_timeout_s: how long the workers may take to start and import the function.
    """

    spec: ScoreFnSpec
    num_workers: int = 0
    timeout_s: float | None = 10.0
    start_method: str | None = None
    startup_timeout_s: float = 120.0
    num_restarts: int = field(default=0, init=False)  # pools recreated after a timeout or crash
    _executor: ProcessPoolExecutor | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0 (0 = score in this process), got {self.num_workers}")
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 seconds or None, got {self.timeout_s}")
        if self.start_method is None:
            self.start_method = _default_start_method()
        if self.start_method not in ("forkserver", "spawn"):
            raise ValueError(
                f"start_method must be 'forkserver' or 'spawn', got {self.start_method!r} ('fork' is unsafe "
                "once torch has started threads)"
            )
        if self.num_workers > 0:
            self._executor = self._start()

    # ------------------------------------------------------------------------------ lifecycle

    def _start(self) -> ProcessPoolExecutor:
        ctx = multiprocessing.get_context(self.start_method)
        ex = ProcessPoolExecutor(self.num_workers, mp_context=ctx, initializer=_init_worker, initargs=(self.spec,))
        # Warm up: every worker starts and imports the function before any deadline runs.
        pids: set[int] = set()
        give_up = time.monotonic() + self.startup_timeout_s
        try:
            while len(pids) < self.num_workers:
                futures = [ex.submit(_ping, 0.05) for _ in range(self.num_workers)]
                done, not_done = wait(futures, timeout=max(give_up - time.monotonic(), 0))
                if not_done:
                    raise TimeoutError(f"reward workers did not start within {self.startup_timeout_s} s")
                pids.update(f.result() for f in done)
        except (BrokenProcessPool, TimeoutError) as e:
            self._kill(ex)
            raise RuntimeError(
                f"could not start {self.num_workers} reward worker processes ({_describe(e)}); the reward function "
                "may fail to import in a fresh process: check it loads with num_workers=0"
            ) from e
        return ex

    @staticmethod
    def _kill(ex: ProcessPoolExecutor) -> None:
        if hasattr(ex, "kill_workers"):  # Python >= 3.14
            ex.kill_workers()
            procs = []
        else:  # the executor keeps its worker processes in a private dict (3.8 - 3.13)
            procs = list((getattr(ex, "_processes", None) or {}).values())
            for p in procs:
                p.kill()
        ex.shutdown(wait=False, cancel_futures=True)
        for p in procs:
            p.join(timeout=5)

    def _restart(self) -> None:
        self._kill(self._executor)
        self._executor = self._start()
        self.num_restarts += 1

    def close(self) -> None:
        """Stop the worker processes (idempotent)."""
        if self._executor is not None:
            self._kill(self._executor)
            self._executor = None

    def __enter__(self) -> "ScoringPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -------------------------------------------------------------------------------- scoring

    def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreOutcome]:
        """One ``ScoreOutcome`` per request, in order; never raises for a failing or hanging sample."""
        if self.num_workers == 0:
            if self.timeout_s is None:
                return [self._score_in_process(r) for r in requests]
            return self._score_in_thread(requests)
        if self._executor is None:
            raise ValueError("this ScoringPool was closed; create a new one")
        return self._score_in_workers(requests)

    def _score_in_process(self, request: ScoreRequest) -> ScoreOutcome:
        call = functools.partial(_score_one, self.spec, request)
        if self.timeout_s is None:
            try:
                return ScoreOutcome("ok", call())
            except Exception as e:
                return ScoreOutcome("error", error=_describe(e))
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                box["result"] = call()
            except BaseException as e:  # noqa: BLE001 - reported, not re-raised
                box["error"] = e

        thread = threading.Thread(target=target, name="mtprl-reward-call", daemon=True)
        thread.start()
        thread.join(self.timeout_s)
        if thread.is_alive():
            return ScoreOutcome("timeout", error=f"no result within {self.timeout_s} s (thread left running)")
        if "error" in box:
            return ScoreOutcome("error", error=_describe(box["error"]))
        return ScoreOutcome("ok", box.get("result"))

    def _score_in_thread(self, requests: Sequence[ScoreRequest]) -> list[ScoreOutcome]:
        """In-process scoring with a deadline: ONE daemon thread scores the batch in order (a thread per sample
        costs ~1-3 ms to start and join, more than the DAPO scorer itself); each sample gets timeout_s from
        when the thread takes it. A sample past its deadline is a timeout, its thread is left running (its
        late results dropped) and a new thread takes the rest of the batch."""
        outcomes: list[ScoreOutcome | None] = [None] * len(requests)
        start = 0
        while start < len(requests):
            cond = threading.Condition()
            state = {"done": start, "t0": time.monotonic(), "abandoned": False}

            def run(first: int = start, state: dict = state, cond: threading.Condition = cond) -> None:
                for i in range(first, len(requests)):
                    try:
                        out = ScoreOutcome("ok", _score_one(self.spec, requests[i]))
                    except BaseException as e:  # noqa: BLE001 - reported, not re-raised
                        out = ScoreOutcome("error", error=_describe(e))
                    with cond:
                        if state["abandoned"]:
                            return
                        outcomes[i] = out
                        state["done"], state["t0"] = i + 1, time.monotonic()
                        cond.notify()

            threading.Thread(target=run, name="mtprl-reward-call", daemon=True).start()
            with cond:
                while state["done"] < len(requests):
                    left = state["t0"] + self.timeout_s - time.monotonic()
                    if left <= 0:  # the sample in progress is past its deadline
                        state["abandoned"] = True
                        outcomes[state["done"]] = ScoreOutcome(
                            "timeout", error=f"no result within {self.timeout_s} s (thread left running)")
                        break
                    cond.wait(left)
                start = state["done"] + 1 if state["abandoned"] else len(requests)
        return outcomes

    def _submit(self, requests, pending: deque, in_flight: dict, suspect: list[bool], budget: float) -> None:
        """Fill free workers from ``pending``; a crash suspect only ever runs alone. A pool that refuses
        work because a worker died while idle (killed from outside, or by a thread a reward call left
        behind) is recreated when nothing is in flight; else its in-flight samples fail with
        BrokenProcessPool and the crash handling of ``_score_in_workers`` recreates it."""
        while pending and len(in_flight) < self.num_workers:
            if any(suspect[f.index] for f in in_flight.values()):
                return  # a suspect is running alone
            i = pending[0]
            if suspect[i] and in_flight:
                return  # wait for the pool to drain, then run the suspect alone
            try:
                fut = self._executor.submit(_score_one, self.spec, requests[i])
            except BrokenProcessPool:
                if in_flight:
                    return
                self._restart()
                continue
            pending.popleft()
            in_flight[fut] = _Flight(i, time.monotonic() + budget)

    def _score_in_workers(self, requests: Sequence[ScoreRequest]) -> list[ScoreOutcome]:
        outcomes: list[ScoreOutcome | None] = [None] * len(requests)
        suspect = [False] * len(requests)  # was in flight when a worker died
        pending = deque(range(len(requests)))
        in_flight: dict[Future, _Flight] = {}
        budget = self.timeout_s if self.timeout_s is not None else math.inf
        while pending or in_flight:
            self._submit(requests, pending, in_flight, suspect, budget)
            next_deadline = min(f.deadline for f in in_flight.values())
            wait_s = None if next_deadline == math.inf else max(next_deadline - time.monotonic(), 0.0)
            wait(list(in_flight), timeout=wait_s, return_when=FIRST_COMPLETED)
            now, broken, expired = time.monotonic(), [], False
            for fut, flight in list(in_flight.items()):
                if fut.done():
                    del in_flight[fut]
                    try:
                        outcomes[flight.index] = ScoreOutcome("ok", fut.result())
                    except BrokenProcessPool:
                        broken.append(flight.index)
                    except Exception as e:
                        outcomes[flight.index] = ScoreOutcome("error", error=_describe(e))
                elif flight.deadline <= now:
                    del in_flight[fut]
                    expired = True
                    outcomes[flight.index] = ScoreOutcome(
                        "timeout", error=f"no result within {self.timeout_s} s (worker killed)"
                    )
            if not (broken or expired):
                continue
            # Killing the pool loses every in-flight sample: they run again from scratch. A crash
            # with one sample in flight names the culprit; with several, each becomes a suspect
            # and is re-run alone.
            lost = broken + [f.index for f in in_flight.values()]
            in_flight.clear()
            if broken and len(lost) == 1:
                outcomes[lost[0]] = ScoreOutcome("error", error="the worker process died while scoring it")
            else:
                for i in lost:
                    suspect[i] = suspect[i] or bool(broken)
                pending.extendleft(reversed(lost))
            self._restart()
        return outcomes  # type: ignore[return-value]
