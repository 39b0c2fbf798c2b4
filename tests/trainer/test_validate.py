"""Validation with trainer.val_greedy: the sampled val_kwargs pass plus a greedy pass, each as a separate
validation with that setting alone would give."""

import pytest

from mtprl.config import load_config
from mtprl.trainer.loop import evaluate

ACC = "val-core/synthetic_arith/acc/mean@{n}"


def _overrides(world, out, *extra):
    return [f"data.val_files={world.data.val}", f"actor_rollout_ref.model.path={world.model}",
            "data.max_response_length=8", "trainer.logger=[jsonl]", f"trainer.default_local_dir={out}",
            "reward_model.num_workers=0", *extra]


SAMPLED = ("actor_rollout_ref.rollout.val_kwargs.do_sample=True", "actor_rollout_ref.rollout.val_kwargs.temperature=1.0",
           "actor_rollout_ref.rollout.val_kwargs.top_p=0.7", "actor_rollout_ref.rollout.val_kwargs.n=3")


def test_val_greedy_adds_the_greedy_pass(tiny_world, tmp_path):
    both = evaluate(load_config(None, _overrides(tiny_world, tmp_path / "both", *SAMPLED, "trainer.val_greedy=True")))
    sampled = evaluate(load_config(None, _overrides(tiny_world, tmp_path / "sampled", *SAMPLED)))
    greedy = evaluate(load_config(None, _overrides(tiny_world, tmp_path / "greedy")))  # val_kwargs default: greedy
    assert both[ACC.format(n=3)] == sampled[ACC.format(n=3)]  # the sampled pass is unchanged
    assert both["val-aux/synthetic_arith/acc/greedy@1"] == greedy[ACC.format(n=1)]
    assert both["val-aux/synthetic_arith/score/greedy@1"] == greedy["val-aux/synthetic_arith/score/mean@1"]
    assert both["val/greedy/response_length/mean"] == pytest.approx(greedy["val/response_length/mean"])
    assert "val-aux/synthetic_arith/acc/greedy@1" not in sampled
    # greedy val_kwargs: the first pass is the greedy one, no second pass
    again = evaluate(load_config(None, _overrides(tiny_world, tmp_path / "again", "trainer.val_greedy=True")))
    assert "val-aux/synthetic_arith/acc/greedy@1" not in again and again[ACC.format(n=1)] == greedy[ACC.format(n=1)]
