"""docs/config.md is generated from the schema's field comments (`mtprl config docs`) and kept current."""

import dataclasses
from pathlib import Path

from mtprl.cli import main
from mtprl.config import schema
from mtprl.config.docs import field_comments, render

ROOT = Path(__file__).resolve().parents[2]

SOURCE = '''
# ------------------------------------------------------------------ section
@dataclass
class A:
    """Intro."""

    x: int = 1  # inline
    # above, line one
    # line two
    y: str = "a"  # and inline
    z: bool = False
    # ours
    w: int = 2
    v: int = 3  # ours: one of ours, said inline


@dataclass
class B:
    u: int = 0  # ours (verl forks' name): marked alone
    t: int = 0
'''


def test_comments_above_and_beside_a_field_and_the_ours_marker():
    assert field_comments(SOURCE) == {
        ("A", "x"): ("inline", False),
        ("A", "y"): ("above, line one line two and inline", False),
        ("A", "z"): ("", False),
        ("A", "w"): ("", True),
        ("A", "v"): ("one of ours, said inline", True),
        ("B", "u"): ("(verl forks' name): marked alone", True),
        ("B", "t"): ("", False),
    }


def test_every_key_has_a_meaning():
    """Megatron's keys excepted: they parse so that verl scripts load, and any value but the default is refused."""
    comments = field_comments(Path(schema.__file__).read_text())
    classes = [c for c in vars(schema).values() if dataclasses.is_dataclass(c) and c is not schema.MegatronConfig]
    missing = [f"{c.__name__}.{f.name}" for c in classes for f in dataclasses.fields(c)
               if not dataclasses.is_dataclass(f.default_factory) and not comments[(c.__name__, f.name)][0]]
    assert missing == [], f"schema fields without a comment (write one beside the field): {missing}"


def test_docs_config_md_is_current(tmp_path):
    out = tmp_path / "config.md"
    assert main(["config", "docs", "--out", str(out)]) == 0
    assert out.read_text() == render()
    assert "## `actor_rollout_ref.rollout`" in render() and "| `max_num_seqs` | `int` | `1024` |" in render()
    assert (ROOT / "docs" / "config.md").read_text() == render(), (
        "docs/config.md is stale: run `mtprl config docs --out docs/config.md` after changing mtprl/config/schema.py")
