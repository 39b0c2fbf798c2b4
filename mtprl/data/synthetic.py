"""Synthetic arithmetic problems in verl's parquet schema, for the embedded offline run.

Levels (each answer a non-negative integer):
    1  a+b            a, b in 0..9                    "3+5 = 8\\nAnswer: 8"
    2  a+b or a-b     a, b in 10..99 (a >= b for -)   "47-12 = 35\\nAnswer: 35"
    3  a*b+c          a, b in 2..9, c in 1..20        "6*7 = 42\\n42+15 = 57\\nAnswer: 57"
    4  (a+b)*c-d      a, b in 2..20, c in 2..9        "12+7 = 19\\n19*3 = 57\\n57-5 = 52\\nAnswer: 52"
                      d in 1..min(50, (a+b)*c)

The worked solution ends with `Answer: <n>` on its own line, so the DAPO scorer (last `Answer:` in
the last 300 characters) grades it. Rows are assigned levels round-robin over `levels`, so the mix is
balanced; repeat a level to weight it ((1, 1, 1, 2): three level-1 rows per level-2 row). Level 1 has
only 100 distinct problems, so train and validation share them; higher levels are large enough that
the splits rarely overlap. Each split draws from its own seeded stream
(`numpy.random.default_rng([seed, split_id])`), so the train rows do not depend on num_val.

How hard, measured (one shared CPU thread, 0.7M-parameter qwen2-style model: hidden 128, 4 layers,
our 409-token vocabulary; SFT on the response tokens, AdamW lr 3e-3, batch 32, greedy decoding on 100
validation problems): with levels (1, 2, 3, 4) the model is at 20% on level 1 and 0-8% on levels 2-4
after 240 s; with TINY_MODEL_LEVELS = (1, 1, 1, 2) it reaches 51% / 73% / 88% on level 1 after
60 / 120 / 180 s and 0% on level 2, so RL has both unsolved easy problems and a harder tier to move on.

Files written by `write_synthetic_math(out_dir, ...)`:
    train.parquet / val.parquet          RL rows: data_source, prompt, ability, reward_model, extra_info
                                         (extra_info: index, level, question, solution, split)
    sft_train.parquet / sft_val.parquet  SFT pairs in verl's SFTDataset layout: `prompt` (str, the user
                                         turn; verl wraps it as one user message), `response` (str, the
                                         worked solution), plus `messages` (full chat, verl's multi-turn
                                         `messages_key`), data_source and extra_info.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

DATA_SOURCE = "synthetic_arith"
ABILITY = "MATH"
REWARD_STYLE = "rule"
LEVELS = (1, 2, 3, 4)
TINY_MODEL_LEVELS = (1, 1, 1, 2)  # the mix for a ~1M-parameter model warmed up for 1-2 min (see above)

# A short form of the DAPO instruction (fixtures: "Solve the following math problem step by step. ...");
# short prompts keep a tiny model's rollouts cheap.
SHORT_INSTRUCTION = 'Solve step by step. Put the final answer on its own line after "Answer:".'
DAPO_INSTRUCTION = (
    "Solve the following math problem step by step. The last line of your response should be of the "
    "form Answer: $Answer (without quotes) where $Answer is the answer to the problem."
)
DAPO_REMINDER = 'Remember to put your answer on its own line after "Answer:".'

_SPLIT_IDS = {"train": 0, "val": 1}


@dataclass(frozen=True)
class MathProblem:
    """level: 1..4; question: the problem line; solution: worked steps ending "Answer: <answer>"."""

    level: int
    question: str
    solution: str
    answer: int


def _randint(rng: np.random.Generator, low: int, high: int) -> int:
    """Uniform integer in [low, high], both ends included."""
    return int(rng.integers(low, high + 1))


def make_problem(level: int, rng: np.random.Generator) -> MathProblem:
    """Draw one problem of the given level (see module docstring for the ranges)."""
    if level == 1:
        a, b = _randint(rng, 0, 9), _randint(rng, 0, 9)
        return MathProblem(1, f"What is {a}+{b}?", f"{a}+{b} = {a + b}\nAnswer: {a + b}", a + b)
    if level == 2:
        a, b = _randint(rng, 10, 99), _randint(rng, 10, 99)
        if rng.integers(0, 2) == 0:
            return MathProblem(2, f"What is {a}+{b}?", f"{a}+{b} = {a + b}\nAnswer: {a + b}", a + b)
        a, b = max(a, b), min(a, b)
        return MathProblem(2, f"What is {a}-{b}?", f"{a}-{b} = {a - b}\nAnswer: {a - b}", a - b)
    if level == 3:
        a, b, c = _randint(rng, 2, 9), _randint(rng, 2, 9), _randint(rng, 1, 20)
        p = a * b
        return MathProblem(3, f"What is {a}*{b}+{c}?", f"{a}*{b} = {p}\n{p}+{c} = {p + c}\nAnswer: {p + c}", p + c)
    if level == 4:
        a, b, c = _randint(rng, 2, 20), _randint(rng, 2, 20), _randint(rng, 2, 9)
        s, p = a + b, (a + b) * c
        d = _randint(rng, 1, min(50, p))
        steps = f"{a}+{b} = {s}\n{s}*{c} = {p}\n{p}-{d} = {p - d}\nAnswer: {p - d}"
        return MathProblem(4, f"What is ({a}+{b})*{c}-{d}?", steps, p - d)
    raise ValueError(f"unknown level {level}; levels are {LEVELS}")


def user_content(question: str, instruction: str = SHORT_INSTRUCTION) -> str:
    """The user turn: instruction, blank line, question (the DAPO template's shape, shortened)."""
    return f"{instruction}\n\n{question}"


def make_problems(num: int, *, seed: int, split: str, levels: Sequence[int] = LEVELS) -> list[MathProblem]:
    """`num` problems, levels round-robin over `levels`, drawn from the (seed, split) stream."""
    if split not in _SPLIT_IDS:
        raise ValueError(f"split must be one of {sorted(_SPLIT_IDS)}, got {split!r}")
    if num < 0:
        raise ValueError(f"number of problems must be >= 0, got {num}")
    if not levels or any(lv not in LEVELS for lv in levels):
        raise ValueError(f"levels must be a non-empty subset of {LEVELS}, got {tuple(levels)}")
    rng = np.random.default_rng([seed, _SPLIT_IDS[split]])
    return [make_problem(levels[i % len(levels)], rng) for i in range(num)]


def rl_row(problem: MathProblem, index: int, split: str, instruction: str = SHORT_INSTRUCTION) -> dict[str, Any]:
    """One RL row in verl's schema."""
    return {
        "data_source": DATA_SOURCE,
        "prompt": [{"role": "user", "content": user_content(problem.question, instruction)}],
        "ability": ABILITY,
        "reward_model": {"ground_truth": str(problem.answer), "style": REWARD_STYLE},
        "extra_info": {
            "index": index,
            "level": problem.level,
            "question": problem.question,
            "solution": problem.solution,
            "split": split,
        },
    }


def prose_solution(problem: MathProblem) -> str:
    """The worked solution with the last line in prose ("The answer is 8.") instead of "Answer: 8": correct
    arithmetic that the DAPO scorer cannot grade (no `Answer:` line, no \\boxed{})."""
    steps = problem.solution.rsplit("\n", 1)[0]
    return f"{steps}\nThe answer is {problem.answer}."


def sft_row(problem: MathProblem, index: int, split: str, instruction: str = SHORT_INSTRUCTION,
            prose: bool = False) -> dict[str, Any]:
    """One SFT row: verl's single-turn `prompt`/`response` strings plus the multi-turn `messages`;
    ``prose`` ends the response with :func:`prose_solution`'s ungradable last line."""
    prompt = user_content(problem.question, instruction)
    response = prose_solution(problem) if prose else problem.solution
    return {
        "data_source": DATA_SOURCE,
        "prompt": prompt,
        "response": response,
        "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
        "extra_info": {"index": index, "level": problem.level, "ground_truth": str(problem.answer), "split": split},
    }


@dataclass(frozen=True)
class SyntheticMathPaths:
    """Paths of the four parquet files written by write_synthetic_math."""

    train: Path
    val: Path
    sft_train: Path
    sft_val: Path


def write_synthetic_math(
    out_dir: str | Path,
    *,
    num_train: int,
    num_val: int,
    seed: int,
    levels: Sequence[int] = LEVELS,
    instruction: str = SHORT_INSTRUCTION,
    sft_prose_frac: float = 0.0,
) -> SyntheticMathPaths:
    """Write RL and SFT parquet files for both splits under out_dir; same arguments -> same files.

    sft_prose_frac: share of SFT responses (chosen with a seeded draw) that end in prose ("The answer is
    n.") instead of "Answer: n" - teacher data from mixed sources, of which only one style is graded.
    RL rows are not affected.
    """
    if num_train <= 0 or num_val <= 0:
        raise ValueError(f"num_train and num_val must be positive, got {num_train} and {num_val}")
    if not 0.0 <= sft_prose_frac <= 1.0:
        raise ValueError(f"sft_prose_frac must lie in [0, 1], got {sft_prose_frac}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = SyntheticMathPaths(
        train=out_dir / "train.parquet", val=out_dir / "val.parquet",
        sft_train=out_dir / "sft_train.parquet", sft_val=out_dir / "sft_val.parquet",
    )
    for split, num, rl_path, sft_path in (
        ("train", num_train, paths.train, paths.sft_train),
        ("val", num_val, paths.val, paths.sft_val),
    ):
        problems = make_problems(num, seed=seed, split=split, levels=levels)
        pq.write_table(pa.Table.from_pylist([rl_row(p, i, split, instruction) for i, p in enumerate(problems)]), rl_path)
        prose = np.random.default_rng([seed, 2, _SPLIT_IDS[split]]).random(num) < sft_prose_frac
        rows = [sft_row(p, i, split, instruction, prose=bool(prose[i])) for i, p in enumerate(problems)]
        pq.write_table(pa.Table.from_pylist(rows), sft_path)
    return paths

