"""DAPO overlong shaping: r = min(-(|y| - (L_max - B)) / B · α, 0)."""

import pytest

from mtprl.reward import overlong_penalty


@pytest.mark.parametrize(
    "length, factor, expected",
    [
        (10, 1.0, 0.0),  # well inside: -(10 - 16)/4 = +1.5 -> min(., 0) = 0
        (16, 1.0, 0.0),  # exactly L_max - B: 0
        (17, 1.0, -0.25),  # -(17 - 16)/4
        (18, 1.0, -0.5),
        (20, 1.0, -1.0),  # at L_max: -α
        (19, 0.5, -0.375),  # -(3/4)·0.5
        (0, 1.0, 0.0),
    ],
)
def test_overlong_penalty_hand_computed(length, factor, expected):
    # L_max = 20, B = 4 -> the ramp starts after 16 tokens
    assert overlong_penalty(length, max_resp_len=20, buffer_len=4, penalty_factor=factor) == pytest.approx(expected)


def test_buffer_equal_to_max_len_ramps_from_zero():
    # B = L_max = 8: -(|y| - 0)/8 -> 4 tokens give -0.5
    assert overlong_penalty(4, 8, 8, 1.0) == pytest.approx(-0.5)


@pytest.mark.parametrize(
    "args, match",
    [
        ((10, 20, 0, 1.0), "buffer_len must be > 0"),
        ((10, 20, -3, 1.0), "buffer_len must be > 0"),
        ((10, 20, 21, 1.0), "must be <= max_resp_len"),
        ((-1, 20, 4, 1.0), "response_length"),
        ((10, 20, 4, -1.0), "penalty_factor"),
    ],
)
def test_bad_settings(args, match):
    with pytest.raises(ValueError, match=match):
        overlong_penalty(*args)
