"""One rank of the 2-rank vLLM loop test (launched as torchrun would, see conftest.launch): setup with
rollout.name=vllm (each rank its own in-process vLLM engine), ``trainer.total_training_steps`` rl_steps, and after
each the list of vLLM target / drafter parameters that differ from the trainer's gathered FSDP state (a
collective). argv: out_json overrides..."""

import json
import os
import sys

import torch

from mtprl.config import load_config
from mtprl.rollout.vllm_engine import weight_mismatches
from mtprl.trainer.loop import rl_step
from mtprl.trainer.setup import setup

torch.set_num_threads(1)


def main(out: str, overrides: list[str]) -> None:
    cfg = load_config(None, overrides)
    run = setup(cfg)
    result: dict = {"rank": run.dist.rank, "mismatches": [weight_mismatches(run.engine, run.model)], "accept": []}
    try:
        for _ in range(cfg.trainer.total_training_steps):
            metrics = rl_step(run)
            run.step += 1
            result["mismatches"].append(weight_mismatches(run.engine, run.model))
            result["accept"].append(metrics["rollout/spec_accept_length"])
        with open(f"{out}.{run.dist.rank}", "w") as f:
            json.dump(result, f)
    finally:
        run.close()
    os._exit(0)  # as loop_worker: skip interpreter teardown of gloo / vLLM threads


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
