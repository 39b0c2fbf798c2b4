"""The DAPO math scorer: +1 if the final answer matches the ground truth, else -1.

Source: DAPO (Yu et al. 2025, arXiv:2503.14476, eq. 4: R(ŷ, y) = 1 if is_equivalent(ŷ, y) else -1)
and verl ``verl/utils/reward_score/math_dapo.py`` (the Minerva normalisation of Lewkowycz et al.
2022, arXiv:2206.14858, appendix D.1). Behaviour, as verl's:

  * only the last 300 characters of the response are read;
  * the prediction is the last match of ``(?i)Answer\\s*:\\s*([^\\n]+)``; prediction and ground
    truth both go through ``normalize_final_answer`` (text after the last "=", the SUBSTITUTIONS and
    REMOVED_EXPRESSIONS lists, \\text{}/\\textbf{}/\\overline{}/\\boxed{} unwrapped, \\fracab and
    \\sqrta shorthands expanded, "$" dropped, thousands commas dropped from integers) and are
    compared as strings;
  * ``strict_box_verify=True``: the prediction is the content of the last \\boxed{...} in the final
    100 characters, compared *as written* (no normalisation) with the ground truth;
  * returns {"score": ±1.0, "acc": bool, "pred": str}.

Where we differ (SPEC §2.6):
  * when there is no ``Answer:`` line we fall back to the strict-box rule (the last \\boxed{} in the
    final 100 characters, compared as written); verl scores such a response -1 with pred
    "[INVALID]". ``boxed_fallback=False`` gives verl's behaviour exactly.
  * ``use_math_verify=True`` adds an equivalence fallback: when the string comparison fails, the
    prediction and ground truth are parsed and compared by ``math_verify`` (so "0.5" matches
    "\\frac{1}{2}"). math-verify's own signal-based timeouts are switched off (they only work in a
    main thread); the caller bounds the time, see ``mtprl.reward.pool``.
  * a ground truth that is not a string (e.g. an int from a parquet column) is converted with str().
"""

from __future__ import annotations

import logging
import re
from typing import Any

__all__ = [
    "INVALID",
    "compute_score",
    "is_correct_minerva",
    "is_correct_strict_box",
    "last_boxed_only_string",
    "math_verify_equal",
    "normalize_final_answer",
    "remove_boxed",
]

INVALID = "[INVALID]"
ANSWER_PATTERN = r"(?i)Answer\s*:\s*([^\n]+)"
RESPONSE_TAIL_CHARS = 300  # the longest MATH-500 answer has 159 characters (verl's comment)
BOX_TAIL_CHARS = 100

# (before, after) string replacements, applied in order, then the removals (verl's lists).
SUBSTITUTIONS = (
    ("an ", ""),
    ("a ", ""),
    (".$", "$"),
    ("\\$", ""),
    (r"\ ", ""),
    (" ", ""),
    ("mbox", "text"),
    (",\\text{and}", ","),
    ("\\text{and}", ","),
    ("\\text{m}", "\\text{}"),
)
REMOVED_EXPRESSIONS = (
    "square", "ways", "integers", "dollars", "mph", "inches", "hours", "km", "units", "\\ldots", "sue",
    "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds", "meters", "meals",
    "edges", "students", "childrentickets", "multiples", "\\text{s}", "\\text{.}", "\\text{\ns}",
    "\\text{}^2", "\\text{}^3", "\\text{\n}", "\\text{}", r"\mathrm{th}", r"^\circ", r"^{\circ}", r"\;",
    r",\!", "{,}", '"', "\\dots",
)  # fmt: skip


def last_boxed_only_string(text: str) -> str | None:
    r"""The last ``\boxed{...}`` of ``text`` with balanced braces (``\boxed{`` included), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start : i + 1]
    return None  # unbalanced: the box never closes


def remove_boxed(boxed: str) -> str:
    r"""``\boxed{x}`` -> ``x``; anything else is a ValueError."""
    left = "\\boxed{"
    if not (boxed.startswith(left) and boxed.endswith("}")):
        raise ValueError(f"expected a string of the form \\boxed{{...}}, got {boxed!r}")
    return boxed[len(left) : -1]


def normalize_final_answer(final_answer: str) -> str:
    """Normalise a final answer for string comparison (Minerva rules, as verl's math_dapo)."""
    final_answer = final_answer.split("=")[-1]
    for before, after in SUBSTITUTIONS:
        final_answer = final_answer.replace(before, after)
    for expr in REMOVED_EXPRESSIONS:
        final_answer = final_answer.replace(expr, "")
    # Keep the math between the first pair of $...$, then unwrap formatting commands.
    final_answer = re.sub(r"(.*?)(\$)(.*?)(\$)(.*)", "$\\3$", final_answer)
    final_answer = re.sub(r"(\\text\{)(.*?)(\})", "\\2", final_answer)
    final_answer = re.sub(r"(\\textbf\{)(.*?)(\})", "\\2", final_answer)
    final_answer = re.sub(r"(\\overline\{)(.*?)(\})", "\\2", final_answer)
    final_answer = re.sub(r"(\\boxed\{)(.*)(\})", "\\2", final_answer)
    # Shorthand TeX: \fracab -> \frac{a}{b}, \sqrta -> \sqrt{a}.
    final_answer = re.sub(r"(frac)([^{])(.)", "frac{\\2}{\\3}", final_answer)
    final_answer = re.sub(r"(sqrt)([^{])", "sqrt{\\2}", final_answer)
    final_answer = final_answer.replace("$", "")
    if final_answer.replace(",", "").isdigit():  # 1,000 -> 1000
        final_answer = final_answer.replace(",", "")
    return final_answer.strip()


def is_correct_minerva(solution: str, ground_truth: str) -> tuple[bool, str, bool]:
    """(correct, normalised prediction, found an Answer: line) for the last ``Answer:`` match."""
    matches = re.findall(ANSWER_PATTERN, solution)
    pred = normalize_final_answer(matches[-1] if matches else INVALID)
    return pred == normalize_final_answer(ground_truth), pred, bool(matches)


def is_correct_strict_box(solution: str, ground_truth: str) -> tuple[bool, str]:
    r"""(correct, pred) for the last ``\boxed{}`` in the final 100 characters, compared as written."""
    boxed = last_boxed_only_string(solution[-BOX_TAIL_CHARS:])
    pred = remove_boxed(boxed) if boxed is not None else INVALID
    return pred == ground_truth, pred


def math_verify_equal(pred: str, ground_truth: str) -> bool:
    """math-verify equivalence of two answers, without its signal-based timeouts (see module doc).

    Both sides are wrapped in ``$...$`` so that plain LaTeX (``\\frac{1}{2}``) is parsed as math.
    Parse failures count as "not equal".
    """
    from math_verify import parse, verify  # lazy: sympy takes a second to import

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # silences "timeout disabled" warnings
    gold = parse(f"${ground_truth}$", parsing_timeout=None)
    target = parse(f"${pred}$", parsing_timeout=None)
    if not gold or not target:
        return False
    return bool(verify(gold, target, timeout_seconds=None))


def compute_score(
    solution: str,
    ground_truth: Any,
    strict_box_verify: bool = False,
    boxed_fallback: bool = True,
    use_math_verify: bool = False,
) -> dict[str, Any]:
    """Score one response: {"score": 1.0 or -1.0, "acc": bool, "pred": str} (module docstring)."""
    if not isinstance(solution, str):
        raise ValueError(f"solution must be the decoded response string, got {type(solution).__name__}")
    ground_truth = ground_truth if isinstance(ground_truth, str) else str(ground_truth)
    solution = solution[-RESPONSE_TAIL_CHARS:]
    if strict_box_verify:
        correct, pred = is_correct_strict_box(solution, ground_truth)
    else:
        correct, pred, found = is_correct_minerva(solution, ground_truth)
        if not found and boxed_fallback:
            correct, pred = is_correct_strict_box(solution, ground_truth)
    if not correct and use_math_verify and pred != INVALID:
        correct = math_verify_equal(pred, ground_truth)
    return {"score": 1.0 if correct else -1.0, "acc": correct, "pred": pred}
