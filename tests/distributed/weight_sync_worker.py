"""One rank of the weight-sync test: dim-0 sharded DTensors of awkward shapes (rows not a multiple of the
world size, fewer rows than ranks, 1-D) and an FSDP2-sharded model, gathered by sync_weights in one
all-gather per bucket, checked against DTensor.full_tensor() on every rank. Writes "ok <rank>" to argv[1]."""

import os
import sys

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from mtprl.distributed.env import destroy_distributed, init_distributed
from mtprl.distributed.parallelize import apply_fsdp
from mtprl.distributed.weight_sync import _gather_rows, sync_weights
from mtprl.model import CausalLM, ModelConfig

torch.set_num_threads(1)


def main(out_path: str) -> None:
    env = init_distributed("cpu", timeout_s=120)
    mesh = init_device_mesh("cpu", (env.world_size,))
    gen = torch.Generator().manual_seed(0)  # the same full tensors on every rank
    shapes = [(7, 3), (1, 4), (5,), (2, 2, 3), (8, 1)]
    fulls = [torch.randn(*s, generator=gen) for s in shapes]
    shards = [distribute_tensor(f, mesh, [Shard(0)]) for f in fulls]
    for got, want, dt in zip(_gather_rows(shards, torch.float32, torch.device("cpu")), fulls, shards):
        assert torch.equal(got, want) and torch.equal(got, dt.full_tensor()), (got.shape, want.shape)
    assert _gather_rows(shards, torch.bfloat16, torch.device("cpu"))[0].dtype == torch.bfloat16

    torch.manual_seed(0)
    model = CausalLM(ModelConfig.tiny(vocab_size=61, num_mtp_layers=1))  # 61 rows: uneven over 2 ranks
    engine = CausalLM(ModelConfig.tiny(vocab_size=61, num_mtp_layers=1))
    with torch.no_grad():
        for p in engine.parameters():
            p.zero_()
    apply_fsdp(model, env)
    stats = sync_weights(model, engine, bucket_bytes=4096)  # small buckets: several all-gathers
    assert stats.num_buckets > 1
    synced = dict(engine.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(synced[name], p.full_tensor()), name
    with open(f"{out_path}.{env.rank}", "w") as f:
        f.write(f"ok {env.rank}")
    destroy_distributed()
    sys.stdout.flush()
    # skip interpreter teardown once the result is written: a passing 2-rank test failed once in a full
    # suite run (not reproduced in 10 reruns, output lost); gloo's threads torn down at exit are the suspect
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1])
