"""The name registry: aliases, duplicate names, closest-name errors."""

import pytest

from mtprl.algorithms import Registry, unknown_name_message


def test_register_get_aliases_and_duplicates():
    reg = Registry("widget")

    @reg.register("alpha", "a")
    def alpha():
        return 1

    assert reg.get("alpha") is alpha and reg.get("a") is alpha
    assert reg.names() == ("a", "alpha") and "alpha" in reg
    reg.register("alpha")(alpha)  # the same function again is harmless

    def other():
        return 2

    with pytest.raises(ValueError, match="already registered"):
        reg.register("alpha")(other)
    with pytest.raises(ValueError, match="non-empty"):
        reg.register("")(other)
    with pytest.raises(ValueError, match="unknown widget 'alpah'; did you mean 'alpha'"):
        reg.get("alpah")


def test_unknown_name_message_lists_names():
    msg = unknown_name_message("mode", "x", ["b", "a"])
    assert msg.endswith("Valid names: a, b")
    assert "did you mean" not in unknown_name_message("mode", "x", [])
