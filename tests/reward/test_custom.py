"""Loading a custom reward function from a file: the function and every start-up error."""

import textwrap

import pytest

from mtprl.reward import load_custom_reward_fn


def write(tmp_path, body, name="my_reward.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def test_loads_and_calls(tmp_path):
    path = write(
        tmp_path,
        """
        def compute_score(data_source, solution_str, ground_truth, extra_info=None, bonus=0.0):
            return {"score": float(solution_str.strip() == ground_truth) + bonus, "acc": solution_str.strip() == ground_truth}

        def helper():
            pass
        """,
    )
    fn = load_custom_reward_fn(path, "compute_score", bonus=0.5)
    out = fn(data_source="x", solution_str=" 4 ", ground_truth="4", extra_info=None, bonus=0.5)
    assert out == {"score": 1.5, "acc": True}
    assert load_custom_reward_fn(str(path))(data_source="x", solution_str="3", ground_truth="4")["score"] == 0.0


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist") as e:
        load_custom_reward_fn(tmp_path / "nope.py", "compute_score")
    assert "nope.py" in str(e.value) and "custom_reward_function.path" in str(e.value)
    with pytest.raises(ValueError, match="empty"):
        load_custom_reward_fn("", "compute_score")


def test_missing_name_lists_available(tmp_path):
    path = write(
        tmp_path,
        """
        def compute_scores(data_source, solution_str, ground_truth, extra_info=None):
            return 0.0

        def other(**kw):
            return 1.0

        CONSTANT = 3
        """,
    )
    with pytest.raises(ValueError) as e:
        load_custom_reward_fn(path, "compute_score")
    msg = str(e.value)
    assert "no function 'compute_score'" in msg and "my_reward.py" in msg
    assert "Did you mean 'compute_scores'" in msg and "compute_scores, other" in msg


def test_import_error_not_callable_and_bad_signature(tmp_path):
    broken = write(tmp_path, "def compute_score(:\n", name="broken.py")
    with pytest.raises(ValueError, match="importing the custom reward file .*broken.py.* SyntaxError"):
        load_custom_reward_fn(broken)
    raising = write(tmp_path, "raise ImportError('needs package foo')\n", name="raising.py")
    with pytest.raises(ValueError, match="needs package foo"):
        load_custom_reward_fn(raising)
    const = write(tmp_path, "compute_score = 3\n", name="const.py")
    with pytest.raises(ValueError, match="not a function"):
        load_custom_reward_fn(const)
    narrow = write(tmp_path, "def compute_score(solution_str, ground_truth):\n    return 0.0\n", name="narrow.py")
    with pytest.raises(ValueError, match="cannot be called as compute_score\\(data_source=..."):
        load_custom_reward_fn(narrow)
    kw = write(tmp_path, "def compute_score(**kwargs):\n    return 0.0\n", name="kw.py")
    assert load_custom_reward_fn(kw, bonus=1)(data_source="d", solution_str="s", ground_truth="g") == 0.0
