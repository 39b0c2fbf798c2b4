"""The DAPO math scorer on hand-picked strings and on the shared parquet fixtures."""

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mtprl.reward import math_dapo
from mtprl.reward.math_dapo import (
    INVALID,
    compute_score,
    last_boxed_only_string,
    normalize_final_answer,
    remove_boxed,
)

DATA = Path("/work/shared/data")


@pytest.mark.parametrize(
    "solution, gt, score, pred",
    [
        ("28 = 1+2+4+7+14\nAnswer: 56", "56", 1.0, "56"),
        ("Answer: 57", "56", -1.0, "57"),
        ("ANSWER:56", "56", 1.0, "56"),  # the pattern is case-insensitive, spaces optional
        ("Answer: $56$", "56", 1.0, "56"),  # $...$ stripped
        ("Answer: 1,000", "1000", 1.0, "1000"),  # thousands comma dropped from an integer
        ("Answer: 56 units", "56", 1.0, "56"),  # spaces removed, then the unit "units" removed
        ("Answer: x = 9", "9", 1.0, "9"),  # text after the last "="
        ("Answer: 30^\\circ", "30", 1.0, "30"),  # ^\circ removed
        ("Answer: \\text{(B)}", "(B)", 1.0, "(B)"),  # \text{} unwrapped
        ("Answer: \\boxed{56}", "56", 1.0, "56"),  # \boxed{} unwrapped on the Answer line
        ("Answer: \\frac12", "\\frac{1}{2}", 1.0, "\\frac{1}{2}"),  # \fracab shorthand expanded
        ("Answer: a 5", "5", 1.0, "5"),  # "a " removed (a Minerva substitution)
        ("Answer: 9.", "9", -1.0, "9."),  # a trailing period is not removed (as verl)
        ("Answer: \\dfrac{1}{2}", "\\frac{1}{2}", -1.0, "\\dfrac{1}{2}"),  # \dfrac is not normalised
        ("Answer: 3\nwait, recheck\nAnswer: 4", "4", 1.0, "4"),  # the last Answer line wins
        ("Answer: 3\nwait, recheck\nAnswer: 4", "3", -1.0, "4"),
    ],
)
def test_answer_line(solution, gt, score, pred):
    out = compute_score(solution, gt)
    assert out == {"score": score, "acc": score > 0, "pred": pred}


def test_ground_truth_is_normalised_too():
    # gt "\$1,000 dollars" -> "\$" removed, spaces, "dollars" removed -> "1,000" -> "1000"
    assert compute_score("Answer: 1000", "\\$1,000 dollars")["score"] == 1.0
    assert compute_score("Answer: 7", 7)["score"] == 1.0  # a non-string ground truth is str()'d


def test_only_the_last_300_characters_are_read():
    # "Answer: 56\n" is 11 characters: with 289 more the string is exactly 300 long -> read
    assert compute_score("Answer: 56\n" + "x" * 289, "56")["score"] == 1.0
    # with 290 more the leading "A" falls out of the window -> no Answer line, no box
    out = compute_score("Answer: 56\n" + "x" * 290, "56")
    assert out == {"score": -1.0, "acc": False, "pred": INVALID}


def test_boxed_fallback_when_no_answer_line():
    assert compute_score("So the sum is \\boxed{56}.", "56") == {"score": 1.0, "acc": True, "pred": "56"}
    # compared as written: no normalisation on this path
    assert compute_score("so \\boxed{56.0}", "56") == {"score": -1.0, "acc": False, "pred": "56.0"}
    assert compute_score("so \\boxed{ 56}", "56")["score"] == -1.0
    assert compute_score("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}")["pred"] == "\\frac{1}{2}"  # nested braces
    # the box must sit in the final 100 characters
    assert compute_score("\\boxed{56}" + "." * 150, "56") == {"score": -1.0, "acc": False, "pred": INVALID}
    # verl's behaviour exactly: no fallback, "[INVALID]"
    assert compute_score("So the sum is \\boxed{56}.", "56", boxed_fallback=False) == {
        "score": -1.0,
        "acc": False,
        "pred": INVALID,
    }
    # with an Answer line the box is ignored
    assert compute_score("\\boxed{56}\nAnswer: 55", "56")["pred"] == "55"


def test_strict_box_verify_uses_the_box_only():
    assert compute_score("\\boxed{56}\nAnswer: 55", "56", strict_box_verify=True)["score"] == 1.0
    assert compute_score("Answer: 56", "56", strict_box_verify=True)["pred"] == INVALID


def test_no_answer_at_all():
    assert compute_score("I do not know.", "56") == {"score": -1.0, "acc": False, "pred": INVALID}
    assert compute_score("", "56")["score"] == -1.0
    with pytest.raises(ValueError, match="decoded response string"):
        compute_score(None, "56")


def test_box_helpers():
    assert last_boxed_only_string("a \\boxed{1} b \\boxed{x^{2}} c") == "\\boxed{x^{2}}"
    assert last_boxed_only_string("\\boxed{unclosed") is None
    assert last_boxed_only_string("no box") is None
    assert remove_boxed("\\boxed{x^{2}}") == "x^{2}"
    with pytest.raises(ValueError, match="boxed"):
        remove_boxed("x")
    assert normalize_final_answer("The answer is $\\frac{3}{4}$.") == "\\frac{3}{4}"


def test_math_verify_fallback():
    # string comparison fails ("0.5" vs "\frac{1}{2}"), math-verify finds them equal
    assert compute_score("Answer: 0.5", "\\frac{1}{2}")["score"] == -1.0
    assert compute_score("Answer: 0.5", "\\frac{1}{2}", use_math_verify=True) == {
        "score": 1.0,
        "acc": True,
        "pred": "0.5",
    }
    assert compute_score("Answer: 2x+1", "1+2x", use_math_verify=True)["score"] == 1.0
    assert compute_score("Answer: 3", "4", use_math_verify=True)["score"] == -1.0
    assert compute_score("nothing", "4", use_math_verify=True)["pred"] == INVALID
    assert math_dapo.math_verify_equal("\\dfrac{1}{2}", "\\frac{1}{2}")


def _rows(name):
    return pq.read_table(DATA / name).to_pylist()


@pytest.mark.parametrize("name", ["aime_2024_layout_sample.parquet", "dapo_math_17k_layout_sample.parquet"])
def test_parquet_fixtures(name):
    rows = _rows(name)
    assert rows and all(r["data_source"] == "math_dapo" for r in rows)
    for r in rows:
        gt = r["reward_model"]["ground_truth"]
        prompt = r["prompt"][0]["content"]
        assert "Answer: $Answer" in prompt  # the DAPO template
        # a response following the template
        assert compute_score(f"Let me work it out.\nAnswer: {gt}", gt) == {"score": 1.0, "acc": True, "pred": gt}
        assert compute_score(f"Answer: ${gt}$", gt)["score"] == 1.0
        assert compute_score(f"Answer: {int(gt) + 1}", gt)["score"] == -1.0
        # echoing the prompt: its last "Answer:" match is '".' -> normalised "." -> wrong
        out = compute_score(prompt, gt)
        assert out["score"] == -1.0 and out["pred"] == "."
