"""Synthetic arithmetic problems in verl's parquet schema, for the embedded offline run.

Short levels (answer in one or a few lines; each answer a non-negative integer):
    1  a+b            a, b in 0..9                    "3+5 = 8\nAnswer: 8"
    2  a+b or a-b     a, b in 10..99 (a >= b for -)   "47-12 = 35\nAnswer: 35"
    3  a*b+c          a, b in 2..9, c in 1..20        "6*7 = 42\n42+15 = 57\nAnswer: 57"
    4  (a+b)*c-d      a, b in 2..20, c in 2..9        "12+7 = 19\n19*3 = 57\n57-5 = 52\nAnswer: 52"
                      d in 1..min(50, (a+b)*c)

Worked levels (column arithmetic written out, one line per column, least significant first; every
operand of a level has the same number of digits; token counts with the demo tokenizer):
    5..12  a+b        1..8 digits (level - 4)      ~27 (1 digit), ~57, ~90, ~125, ~165, ~205 (6) to ~300 tokens (8)
    13     a-b        3 digits, a >= b, a-b has 3 digits          ~75 tokens
    14     a*d        3 digits times one digit 2..9               ~90 tokens
    15     a+b+c      3 digits                                    ~105 tokens
    16     a+b+c+d    4 digits                                    ~170 tokens

A sum's line starts with the columns still to add (the operands with the columns done dropped) and the
carry coming in, so the digits it adds end those numbers, a few tokens back: a small model finds them there
far sooner than at a distance in the question that changes with every line written (measured: with the column
named instead, 2-digit sums stayed at ~12% greedy after the demo's SFT; with this form 88%). Subtraction and
product lines name their column. Each line adds the column's digits and the carry (subtracts with the borrow, multiplies
and adds the carry), carries on, and keeps the result so far (its new digit in front); the last column
writes its whole sum:

    472+385 carry 0: 2+5+0=7, carry 0, so far 7
    47+38 carry 0: 7+8+0=15, carry 1, so far 57
    4+3 carry 1: 4+3+1=8, so far 857
    Answer: 857                                                    (472+385)

    units: 3-0-8<0, 13-0-8=5, borrow 1, so far 5
    tens: 0-1-5<0, 10-1-5=4, borrow 1, so far 45
    hundreds: 4-1-1=2, so far 245
    Answer: 245                                                    (403-158)

    units: 7*8=56, 56+0=56, carry 5, so far 6
    tens: 4*8=32, 32+5=37, carry 3, so far 76
    hundreds: 3*8=24, 24+3=27, so far 2776
    Answer: 2776                                                   (347*8)

A line reads the question's digits of its column (named by the line, at the same place in every problem of a
level) and what the lines above hold (the carry, the result so far), so a small model can learn the procedure
from a few thousand examples; what it must get right is the digit arithmetic of each column, and a long
problem is the same step many times over, so it has more chances to go wrong.

The worked solution ends with `Answer: <n>` on its own line, so the DAPO scorer (last `Answer:` in
the last 300 characters) grades it. Rows are assigned levels round-robin over `levels`, so the mix is
balanced; repeat a level to weight it ((1, 1, 1, 2): three level-1 rows per level-2 row). Level 1 has
only 100 distinct problems, so train and validation share them unless `disjoint=True` (then validation
skips every question the train split has, drawing on from its own stream). Each split draws from its own
seeded stream (`numpy.random.default_rng([seed, split_id])`), so the train rows do not depend on num_val.

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

import dataclasses
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

DATA_SOURCE = "synthetic_arith"
ABILITY = "MATH"
REWARD_STYLE = "rule"
LEVELS = (1, 2, 3, 4)  # the short levels, the default mix
WORKED_LEVELS = tuple(range(5, 17))  # column arithmetic written out (WORKED_SHAPES)
ALL_LEVELS = LEVELS + WORKED_LEVELS
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
_MAX_DRAWS = 1000  # draws per problem before make_problems gives up finding one on its side of the split
HELD_OUT_EVERY = 8  # disjoint splits: one question in 8 of the problem space is held out for validation


@dataclass(frozen=True)
class MathProblem:
    """level: 1..10; question: the problem line; solution: worked steps ending "Answer: <answer>"."""

    level: int
    question: str
    solution: str
    answer: int


def _randint(rng: np.random.Generator, low: int, high: int) -> int:
    """Uniform integer in [low, high], both ends included."""
    return int(rng.integers(low, high + 1))


COLUMN_NAMES = ("units", "tens", "hundreds", "thousands", "ten-thousands", "hundred-thousands", "millions",
                "ten-millions")
# worked level -> (operation, number of operands, digits per operand); every operand has exactly that many digits
WORKED_SHAPES = {5: ("+", 2, 1), 6: ("+", 2, 2), 7: ("+", 2, 3), 8: ("+", 2, 4), 9: ("+", 2, 5), 10: ("+", 2, 6),
                 11: ("+", 2, 7), 12: ("+", 2, 8), 13: ("-", 2, 3), 14: ("*", 1, 3), 15: ("+", 3, 3),
                 16: ("+", 4, 4)}


def _column_sum(operands: list[int], slip: Callable[[], bool] | None = None) -> list[str]:
    """Worked lines of sum(operands), one per column, least significant first (module docstring). ``slip``: a
    careless writer - called at each column that carries (total >= 10, not the last column); when it returns True
    the line writes "carry 0" and the next columns go on from that, so the lines and the answer stay consistent
    with the slip and the answer is wrong."""
    width = max(len(str(x)) for x in operands)
    digits = [str(x).rjust(width, "0") for x in operands]
    lines, carry, so_far = [], 0, ""
    for k in range(width):
        column = [int(d[width - 1 - k]) for d in digits]
        total = sum(column) + carry
        rest = "+".join(str(x // 10**k) for x in operands)  # the columns still to add: the next digits end each number
        step = f"{rest} carry {carry}: {'+'.join(map(str, column))}+{carry}={total}"
        if k == width - 1:  # the last column writes its whole sum
            so_far = f"{total}{so_far}"
            lines.append(f"{step}, so far {so_far}")
        else:
            so_far = f"{total % 10}{so_far}"
            carry = 0 if total >= 10 and slip is not None and slip() else total // 10
            lines.append(f"{step}, carry {carry}, so far {so_far}")
    return lines


def _column_difference(a: int, b: int) -> list[str]:
    """Worked lines of a - b (a >= b, both with the same number of digits, a - b too), one per column."""
    width = len(str(a))
    top, bottom = str(a), str(b).rjust(width, "0")
    lines, borrow, so_far = [], 0, ""
    for k in range(width):
        x, y = int(top[width - 1 - k]), int(bottom[width - 1 - k])
        sub = f"{x}-{borrow}-{y}"
        value = x - borrow - y
        step, borrow_out = (f"{sub}<0, 1{sub}={value + 10}", 1) if value < 0 else (f"{sub}={value}", 0)
        value %= 10
        so_far = f"{value}{so_far}"
        if k == width - 1:
            lines.append(f"{COLUMN_NAMES[k]}: {step}, so far {so_far}")
        else:
            lines.append(f"{COLUMN_NAMES[k]}: {step}, borrow {borrow_out}, so far {so_far}")
        borrow = borrow_out
    return lines


def _column_product(a: int, d: int) -> list[str]:
    """Worked lines of a * d (d one digit), one per digit of a."""
    top = str(a)
    width = len(top)
    lines, carry, so_far = [], 0, ""
    for k in range(width):
        x = int(top[width - 1 - k])
        total = x * d + carry
        step = f"{COLUMN_NAMES[k]}: {x}*{d}={x * d}, {x * d}+{carry}={total}"
        if k == width - 1:
            so_far = f"{total}{so_far}"
            lines.append(f"{step}, so far {so_far}")
        else:
            so_far = f"{total % 10}{so_far}"
            lines.append(f"{step}, carry {total // 10}, so far {so_far}")
            carry = total // 10
    return lines


def _n_digits(rng: np.random.Generator, digits: int) -> int:
    """Uniform over the numbers with exactly `digits` digits (0..9 for one digit)."""
    return _randint(rng, 0 if digits == 1 else 10 ** (digits - 1), 10 ** digits - 1)


def make_worked_problem(level: int, rng: np.random.Generator) -> MathProblem:
    """One problem of a worked level (shapes in WORKED_SHAPES, format in the module docstring)."""
    if level not in WORKED_SHAPES:
        raise ValueError(f"unknown level {level}; levels are {ALL_LEVELS}")
    op, count, digits = WORKED_SHAPES[level]
    if op == "+":
        ops = [_n_digits(rng, digits) for _ in range(count)]
        expr, lines, answer = "+".join(map(str, ops)), _column_sum(ops), sum(ops)
    elif op == "-":
        while True:  # the difference keeps the digits of a: no leading zero in the result so far
            a, b = sorted((_n_digits(rng, digits), _n_digits(rng, digits)), reverse=True)
            if len(str(a - b)) == digits:
                break
        expr, lines, answer = f"{a}-{b}", _column_difference(a, b), a - b
    else:
        a, d = _n_digits(rng, digits), _randint(rng, 2, 9)
        expr, lines, answer = f"{a}*{d}", _column_product(a, d), a * d
    return MathProblem(level, f"What is {expr}?", "\n".join(lines + [f"Answer: {answer}"]), answer)


def make_problem(level: int, rng: np.random.Generator) -> MathProblem:
    """Draw one problem of the given level (see module docstring for the ranges)."""
    if level in WORKED_LEVELS:
        return make_worked_problem(level, rng)
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
    raise ValueError(f"unknown level {level}; levels are {ALL_LEVELS}")


def user_content(question: str, instruction: str = SHORT_INSTRUCTION) -> str:
    """The user turn: instruction, blank line, question (the DAPO template's shape, shortened)."""
    return f"{instruction}\n\n{question}"


def held_out(question: str, seed: int) -> bool:
    """Whether `question` belongs to the held-out (validation) part of the problem space: a seeded hash puts
    one question in HELD_OUT_EVERY there, independently of how many problems are drawn."""
    return zlib.crc32(f"{seed}:{question}".encode()) % HELD_OUT_EVERY == 0


def make_problems(num: int, *, seed: int, split: str, levels: Sequence[int] = LEVELS,
                  disjoint: bool = False) -> list[MathProblem]:
    """`num` problems, levels round-robin over `levels`, drawn from the (seed, split) stream. With `disjoint`,
    a draw on the wrong side of :func:`held_out` is skipped (the stream goes on): validation problems come from
    the held-out part of the problem space and train problems from the rest, so the splits never share one."""
    if split not in _SPLIT_IDS:
        raise ValueError(f"split must be one of {sorted(_SPLIT_IDS)}, got {split!r}")
    if num < 0:
        raise ValueError(f"number of problems must be >= 0, got {num}")
    if not levels or any(lv not in ALL_LEVELS for lv in levels):
        raise ValueError(f"levels must be a non-empty subset of {ALL_LEVELS}, got {tuple(levels)}")
    rng = np.random.default_rng([seed, _SPLIT_IDS[split]])
    problems = []
    for i in range(num):
        for _ in range(_MAX_DRAWS):
            problem = make_problem(levels[i % len(levels)], rng)
            if not disjoint or held_out(problem.question, seed) == (split == "val"):
                break
        else:
            raise ValueError(f"level {levels[i % len(levels)]}: no {split} problem in {_MAX_DRAWS} draws")
        problems.append(problem)
    return problems


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


def careless_solution(problem: MathProblem, rng: np.random.Generator, slip_frac: float) -> str:
    """The worked solution of a worked-sum problem (levels 5-12, 15, 16) as a careless teacher writes it: each
    carry of 1 or more is dropped ("carry 0") with probability slip_frac and the columns after it follow from the
    slip, so the answer is wrong whenever a slip happens. Other problems keep their solution."""
    level = WORKED_SHAPES.get(problem.level)
    if level is None or level[0] != "+" or slip_frac == 0.0:
        return problem.solution
    operands = [int(x) for x in problem.question.removeprefix("What is ").removesuffix("?").split("+")]
    lines = _column_sum(operands, slip=lambda: bool(rng.random() < slip_frac))
    answer = int(lines[-1].rsplit("so far ", 1)[1])
    return "\n".join(lines + [f"Answer: {answer}"])


def sft_row(problem: MathProblem, index: int, split: str, instruction: str = SHORT_INSTRUCTION,
            prose: bool = False, solution: str | None = None) -> dict[str, Any]:
    """One SFT row: verl's single-turn `prompt`/`response` strings plus the multi-turn `messages`;
    ``prose`` ends the response with :func:`prose_solution`'s ungradable last line; ``solution`` replaces the
    worked solution (e.g. :func:`careless_solution`)."""
    prompt = user_content(problem.question, instruction)
    if solution is not None:
        problem = dataclasses.replace(problem, solution=solution)
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
    sft_slip_frac: float = 0.0,
    disjoint: bool = False,
) -> SyntheticMathPaths:
    """Write RL and SFT parquet files for both splits under out_dir; same arguments -> same files.

    disjoint: the splits share no question (validation from the held-out part of the problem space, see
    make_problems).

    sft_prose_frac: share of SFT responses (chosen with a seeded draw) that end in prose ("The answer is
    n.") instead of "Answer: n" - teacher data from mixed sources, of which only one style is graded.
    RL rows are not affected.

    sft_slip_frac: the SFT teacher is careless - in the worked sums of the SFT files each carry is dropped with
    this probability (:func:`careless_solution`), so the SFT model learns to slip as often and RL, rewarded on the
    answer alone, has something to correct. RL rows (prompts and ground truths) are not affected.
    """
    if num_train <= 0 or num_val <= 0:
        raise ValueError(f"num_train and num_val must be positive, got {num_train} and {num_val}")
    for name, frac in (("sft_prose_frac", sft_prose_frac), ("sft_slip_frac", sft_slip_frac)):
        if not 0.0 <= frac <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {frac}")
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
        problems = make_problems(num, seed=seed, split=split, levels=levels, disjoint=disjoint)
        pq.write_table(pa.Table.from_pylist([rl_row(p, i, split, instruction) for i, p in enumerate(problems)]), rl_path)
        prose = np.random.default_rng([seed, 2, _SPLIT_IDS[split]]).random(num) < sft_prose_frac
        slips = np.random.default_rng([seed, 3, _SPLIT_IDS[split]])
        rows = [sft_row(p, i, split, instruction, prose=bool(prose[i]),
                        solution=careless_solution(p, slips, sft_slip_frac)) for i, p in enumerate(problems)]
        pq.write_table(pa.Table.from_pylist(rows), sft_path)
    return paths

