"""One rank of the multi-rank loop tests (launched as torchrun would, see conftest.launch).

argv: mode out_json overrides...  modes:
  sync    run ``trainer.total_training_steps`` steps of the real loop pieces (setup + rl_step); after every
          step compare this rank's engine weights (the packed trunk and MTP tensors it decodes and drafts
          with) with a PackedModel built from the gathered trainer state; write the max differences.
  resume  setup (which resumes per trainer.resume_mode) and compare the restored policy, gathered, with
          the resumed checkpoint's HF export; write the difference and the resumed step.
"""

import json
import sys

import torch

from mtprl.config import load_config
from mtprl.distributed.parallelize import full_state_dict
from mtprl.distributed.weight_sync import stepper_weights
from mtprl.model import from_pretrained
from mtprl.model.packed import PackedModel
from mtprl.trainer import loop
from mtprl.trainer.loop import rl_step
from mtprl.trainer.setup import setup

torch.set_num_threads(1)
trained_groups: list[int] = []  # groups in each update's batch (recorded by the wrapper below)
_real_update = loop.actor_update


def _recording_update(model, optimizer, batch, cfg, generator, dp=None):
    trained_groups.append(len(set(batch.group_ids.tolist())))
    return _real_update(model, optimizer, batch, cfg, generator, dp=dp)


loop.actor_update = _recording_update


def engine_vs_trainer(run) -> tuple[float, float]:
    """(max |engine - trainer| over every packed tensor, the same over the MTP tensors only)."""
    state = full_state_dict(run.model)  # a collective: every rank
    reference = from_pretrained(run.cfg.actor_rollout_ref.model.path)
    reference.load_state_dict(state)
    want = stepper_weights(PackedModel(reference))
    have = stepper_weights(run.engine.current_stepper())
    assert want.keys() == have.keys() and any(k.startswith("mtp") for k in want)
    diffs = {k: float((want[k] - have[k]).abs().max()) for k in want}
    return max(diffs.values()), max(v for k, v in diffs.items() if k.startswith("mtp"))


def main(mode: str, out: str, overrides: list[str]) -> None:
    cfg = load_config(None, overrides)
    run = setup(cfg)
    result: dict = {"rank": run.dist.rank, "world": run.dist.world_size, "step": run.step}
    try:
        if mode == "sync":
            initial_mtp = {k: v.clone() for k, v in stepper_weights(run.engine.current_stepper()).items()
                           if k.startswith("mtp")}
            result["diffs"] = []
            for _ in range(cfg.trainer.total_training_steps):
                metrics = rl_step(run)
                run.step += 1
                result["diffs"].append(engine_vs_trainer(run))
                result.setdefault("sync_s", []).append(metrics.get("timing_s/update_weights"))
                result.setdefault("num_groups", []).append(trained_groups.pop())
            moved = stepper_weights(run.engine.current_stepper())
            result["mtp_moved"] = max(float((moved[k] - v).abs().max()) for k, v in initial_mtp.items())
        else:
            state = full_state_dict(run.model)
            saved = from_pretrained(str(run.last_checkpoint / "actor")).state_dict()
            result["resume_diff"] = max(float((state[k] - saved[k]).abs().max()) for k in saved)
            result["checkpoint"] = str(run.last_checkpoint)
    finally:
        run.close()
    with open(f"{out}.{run.dist.rank}", "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
