"""The CUDA-only choices of the distributed path, checked on CPU: the process group's back-ends, where a weight
sync bucket travels, Ray's device for ``trainer.device=auto``, and the device clock of the phase timings."""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from mtprl.config.loader import ConfigError
from mtprl.distributed import env as env_mod
from mtprl.distributed.env import CUDA_BACKEND, DistEnv, init_distributed
from mtprl.distributed.ray_launcher import ray_device

HERE = Path(__file__).parent


def test_cuda_ranks_get_a_process_group_with_gloo_for_cpu_tensors(monkeypatch):
    """param_offload keeps shards, gradients (the grad norm's all-reduce) and resume's state on the CPU: nccl
    alone has no CPU back-end ("No backend type associated with device type cpu")."""
    seen = {}
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: seen.setdefault("device", index))
    monkeypatch.setattr(env_mod.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(env_mod.dist, "init_process_group", lambda **kw: seen.update(kw))
    env = init_distributed("cuda", timeout_s=60)
    assert seen["backend"] == "cuda:nccl,cpu:gloo" == CUDA_BACKEND
    assert seen["device"] == 1 and env.device == torch.device("cuda", 1) and env.backend == CUDA_BACKEND
    assert env._comm_device() == torch.device("cuda", 1)  # small all-reduces ride nccl
    assert DistEnv(rank=0, world_size=2, backend="gloo")._comm_device() == torch.device("cpu")


def test_cpu_ranks_stay_on_gloo(monkeypatch):
    seen = {}
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(env_mod.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(env_mod.dist, "init_process_group", lambda **kw: seen.update(kw))
    assert init_distributed("cpu", timeout_s=60).backend == "gloo" == seen["backend"]


def test_a_weight_sync_bucket_moves_to_the_rollout_device_before_the_gather(monkeypatch, tmp_path):
    """With param_offload the FSDP shards are on the CPU; the bucket must reach the rollout copy's device (the
    GPU) before its all-gather, so it travels over nccl. Shown here with the meta device as the destination."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from mtprl.distributed.weight_sync import _gather_rows

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        shards = [distribute_tensor(torch.randn(5, 3), mesh, [Shard(0)]),
                  distribute_tensor(torch.randn(2), mesh, [Shard(0)])]
        devices = []

        def gather(out, flat, group=None):
            devices.append((flat.device, out.device, flat.dtype))

        monkeypatch.setattr(dist, "all_gather_single", gather, raising=False)
        monkeypatch.setattr(dist, "all_gather_into_tensor", gather)
        out = _gather_rows(shards, torch.bfloat16, torch.device("meta"))
        assert devices == [(torch.device("meta"), torch.device("meta"), torch.bfloat16)]  # one gather, on the device
        assert [tuple(t.shape) for t in out] == [(5, 3), (2,)] and all(t.is_meta for t in out)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("device, gpus, want", [("auto", 0, "cpu"), ("auto", 8, "cuda"), ("auto", 16.0, "cuda"),
                                                ("cpu", 8, "cpu"), ("cuda", 8, "cuda")])
def test_ray_resolves_auto_on_the_driver(device, gpus, want):
    assert ray_device(device, 8, gpus) == want


@pytest.mark.parametrize("device", ["auto", "cuda"])
def test_ray_refuses_fewer_gpus_than_ranks(device):
    with pytest.raises(ConfigError, match=r"3 GPU\(s\) for 8 ranks"):
        ray_device(device, 8, 3)


def test_ray_bundles_reserve_gpus_for_auto_on_a_gpu_cluster(monkeypatch):
    """The placement group asks for a GPU per rank when ``auto`` finds GPUs (it asked for none: the workers saw no
    GPU and trained on CPUs without a word)."""
    import importlib

    import ray

    pg_mod = importlib.import_module("ray.util.placement_group")

    from mtprl.config.loader import load_config
    from mtprl.distributed.ray_launcher import run_with_ray

    class Placed(Exception):
        pass

    bundles = []

    def placement_group(b, strategy):
        bundles.extend(b)
        raise Placed

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 32.0, "GPU": 8.0})
    monkeypatch.setattr(pg_mod, "placement_group", placement_group)
    cfg = load_config(None, ["trainer.device=auto", "trainer.n_gpus_per_node=4", "trainer.nnodes=2"])
    with pytest.raises(Placed):
        run_with_ray(cfg)
    assert bundles == [{"CPU": 1, "GPU": 1}] * 8


def test_phase_timings_wait_for_the_gpu(monkeypatch):
    """CUDA work is queued: a phase's time is read after torch.cuda.synchronize (twice per timed phase), never on
    the CPU."""
    from mtprl.metrics.clock import device_clock
    from mtprl.trainer.loop import timed

    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(torch.device(device)))
    metrics = {}
    with timed(metrics, "update_actor", torch.device("cuda", 0)):
        pass
    assert calls == [torch.device("cuda", 0)] * 2 and metrics["timing_s/update_actor"] >= 0
    with timed(metrics, "update_actor", torch.device("cpu")):
        pass
    device_clock("cpu")
    device_clock(None)
    assert len(calls) == 2


@pytest.mark.slow
@pytest.mark.parametrize("world, stored_mtp, tied, num_mtp", [(2, 1, False, 3), (3, 0, True, 2)])
def test_sharded_loading_reads_only_each_ranks_rows(tiny_world, tmp_path, launch_ranks, world, stored_mtp, tied,
                                                    num_mtp):
    """Multi-rank set-up builds the policy on the meta device, shards it and reads each rank's rows from the
    safetensors files (it loaded the whole fp32 model on every rank's device, then deep-copied it): the gathered
    weights equal from_pretrained's, fresh MTP layers (copies of a stored MTP layer, or derived from the trunk)
    and uneven rows (3 ranks) included, and each rank reads ~1/world of the checkpoint."""
    import json

    from mtprl.model import ModelConfig
    from mtprl.trainer.policy import init_policy_checkpoint

    model_dir = tmp_path / "policy"
    # hidden 36 and vocabulary 331: rows that do not split evenly over 2 or 3 ranks
    cfg = ModelConfig.tiny(vocab_size=331, hidden_size=36, intermediate_size=52, num_attention_heads=3,
                           num_key_value_heads=1, num_mtp_layers=stored_mtp, tie_word_embeddings=tied)
    init_policy_checkpoint(model_dir, cfg, tiny_world.tokenizer, seed=3)
    launch_ranks(HERE / "sharded_load_worker.py", world, str(tmp_path / "out"), str(model_dir), str(num_mtp))
    results = [json.loads((tmp_path / f"out.{r}").read_text()) for r in range(world)]
    for res in results:
        assert res["keys_equal"] and res["diff"] == 0.0 and res["inv_freq"] == 0.0
        assert res["read"] <= res["total"] / world * 1.1
    assert sum(res["read"] for res in results) == results[0]["total"]  # every row read once, by one rank
