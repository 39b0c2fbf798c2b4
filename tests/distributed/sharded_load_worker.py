"""One rank of the sharded-loading test (launched as torchrun would, see conftest.launch).

argv: out model_dir num_mtp_layers. Loads the policy with load_sharded_policy, gathers it and compares it
with from_pretrained's whole load; counts the bytes this rank read from the checkpoint; writes both.
"""

import json
import sys

import torch

from mtprl.config.schema import ModelConfig as PolicyConfig
from mtprl.distributed.env import destroy_distributed, init_distributed
from mtprl.distributed.loading import load_sharded_policy
from mtprl.distributed.parallelize import full_state_dict
from mtprl.model import from_pretrained
from mtprl.model.hf_io.checkpoint import CheckpointReader

torch.set_num_threads(1)
read_bytes = [0]
depth = [0]
_read = CheckpointReader.read


def counting_read(self, name, rows=None, **kw):
    """Counts the elements of each parameter read (a fresh MTP layer's nested reads count once)."""
    depth[0] += 1
    try:
        t = _read(self, name, rows, **kw)
    finally:
        depth[0] -= 1
    if depth[0] == 0:
        read_bytes[0] += t.numel() * 4  # as fp32
    return t


CheckpointReader.read = counting_read


def main(out: str, model_dir: str, num_mtp: str) -> None:
    env = init_distributed("cpu", timeout_s=60)
    cfg = PolicyConfig(path=model_dir)
    cfg.mtp.enable, cfg.mtp.num_layers = True, int(num_mtp)
    model = load_sharded_policy(cfg, env)
    own = read_bytes[0]
    state = full_state_dict(model)
    CheckpointReader.read = _read
    whole = from_pretrained(model_dir, num_mtp_layers=int(num_mtp)).state_dict()
    diff = max(float((state[k] - whole[k]).abs().max()) for k in whole)
    total = sum(t.numel() * 4 for t in whole.values())
    result = {"keys_equal": sorted(state) == sorted(whole), "diff": diff, "read": own, "total": total,
              "inv_freq": float((model.inv_freq - from_pretrained(model_dir).inv_freq).abs().max())}
    with open(f"{out}.{env.rank}", "w") as f:
        json.dump(result, f)
    destroy_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:4])
    import os

    os._exit(0)
