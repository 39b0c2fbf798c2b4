"""Multi-rank runs through Ray: one worker actor per rank, placed by a placement group.

Ray only places, starts and watches the ranks; each worker runs the same SPMD loop that ``torchrun``
would start (:func:`mtprl.trainer.loop.train` with ``RANK`` / ``WORLD_SIZE`` / ``MASTER_*`` set), so
there is one training code path. The driver (the ``mtprl train`` process):

1. ``ray.init`` with ``ray_kwargs.ray_init`` (``address=auto`` joins a cluster started with
   ``ray start --head`` / ``ray start --address``; none starts a local one), the runtime env from
   ``ray_kwargs.ray_init.runtime_env`` or ``--runtime-env FILE`` (the seed's ``runtime_env.yaml``);
2. a placement group of one bundle per rank (1 GPU + 1 CPU on CUDA, 1 CPU on CPU), ``PACK`` so the
   ranks fill a node before the next (``trainer.n_gpus_per_node`` per node);
3. asks rank 0 for its address and a free port (the rendezvous), starts every rank, and waits;
4. when a worker dies or raises, kills the others at once and raises one error naming the rank and
   the last intact checkpoint; the same command then resumes (``trainer.resume_mode=auto``).
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

from mtprl.config.loader import ConfigError, to_dict
from mtprl.config.schema import MtprlConfig


def ray_device(device: str, world: int, cluster_gpus: float) -> str:
    """``trainer.device`` for the ranks of a Ray run, decided on the driver from the cluster's resources
    (``ray.cluster_resources()["GPU"]``): a worker sees only the GPUs its bundle reserves, so ``auto`` must be
    resolved before the placement group is made, not on a worker (where it would find no GPU and train on
    the CPU without a word). ``auto``: ``cuda`` when the cluster has a GPU per rank, ``cpu`` when it has none;
    a cluster with some GPUs but fewer than the ranks is an error, as is ``cuda`` without enough of them."""
    gpus = int(cluster_gpus)
    if device == "auto":
        if gpus == 0:
            return "cpu"
        if gpus >= world:
            return "cuda"
        raise ConfigError(f"trainer.device=auto: the Ray cluster has {gpus} GPU(s) for {world} ranks "
                         "(trainer.nnodes x trainer.n_gpus_per_node); lower the rank count to the GPUs, or set "
                         "trainer.device=cpu to train on CPUs")
    if device.startswith("cuda") and gpus < world:
        raise ConfigError(f"trainer.device={device}: the Ray cluster has {gpus} GPU(s) for {world} ranks "
                         "(trainer.nnodes x trainer.n_gpus_per_node)")
    return device


class WorkerFailed(RuntimeError):
    """A rank of a Ray run died or raised; the message names the rank and the last intact checkpoint."""


def _worker_class():
    import ray

    @ray.remote
    class RankWorker:
        """One rank: runs the SPMD training loop in this actor's process."""

        def node(self) -> tuple[str, str]:
            return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()

        def free_port(self) -> int:
            with socket.socket() as s:
                s.bind(("", 0))
                return s.getsockname()[1]

        def run(self, cfg_dict: dict, env: dict[str, str]) -> dict[str, float]:
            os.environ.update(env)
            import torch

            from mtprl.config.loader import from_dict
            from mtprl.trainer.loop import train

            torch.set_num_threads(int(env.get("OMP_NUM_THREADS", "1")))
            return train(from_dict(cfg_dict))

    return RankWorker


def _rank_envs(nodes: list[tuple[str, str]], master: tuple[str, int], threads: int) -> list[dict[str, str]]:
    """RANK / LOCAL_RANK / WORLD_SIZE / MASTER_* per rank; local ranks count the ranks on each node."""
    per_node: dict[str, int] = {}
    envs = []
    for rank, (node_id, _) in enumerate(nodes):
        local = per_node.get(node_id, 0)
        per_node[node_id] = local + 1
        envs.append({"RANK": str(rank), "WORLD_SIZE": str(len(nodes)), "LOCAL_RANK": str(local),
                     "MASTER_ADDR": master[0], "MASTER_PORT": str(master[1]), "OMP_NUM_THREADS": str(threads),
                     "MTPRL_LAUNCHER": "ray"})
    for env in envs:
        env["LOCAL_WORLD_SIZE"] = str(per_node[nodes[int(env["RANK"])][0]])
    return envs


def run_with_ray(cfg: MtprlConfig, *, runtime_env: dict[str, Any] | None = None,
                 poll_s: float = 0.5) -> dict[str, float]:
    """Run ``cfg`` on ``trainer.nnodes x trainer.n_gpus_per_node`` Ray workers; rank 0's last metrics."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    world = cfg.trainer.nnodes * cfg.trainer.n_gpus_per_node
    init = cfg.ray_kwargs.ray_init
    env = dict(to_dict(cfg)["ray_kwargs"]["ray_init"]["runtime_env"])
    env.update(runtime_env or {})
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    started_here = not ray.is_initialized()
    if started_here:
        kwargs: dict[str, Any] = {"address": init.address, "runtime_env": env or None, "log_to_driver": True}
        if init.address is None:
            kwargs["num_cpus"] = init.num_cpus or max(world, os.cpu_count() or 1)
        ray.init(**{k: v for k, v in kwargs.items() if v is not None})
    try:
        device = ray_device(cfg.trainer.device, world, ray.cluster_resources().get("GPU", 0))
    except ConfigError:
        if started_here:
            ray.shutdown()
        raise
    cuda = device.startswith("cuda")
    bundle = {"CPU": 1, "GPU": 1} if cuda else {"CPU": 1}
    pg = placement_group([dict(bundle) for _ in range(world)], strategy="PACK")
    workers = []
    try:
        ray.get(pg.ready(), timeout=300)
        cls = _worker_class()
        workers = [cls.options(num_cpus=1, num_gpus=1 if cuda else 0,
                               scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)
                               ).remote() for i in range(world)]
        nodes = ray.get([w.node.remote() for w in workers])
        master = (nodes[0][1], ray.get(workers[0].free_port.remote()))
        threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
        envs = _rank_envs(nodes, master, threads)
        cfg_dict = absolute_paths(to_dict(cfg))
        cfg_dict["trainer"]["device"] = device  # what the bundles reserved, never re-resolved on a worker
        futures = {w.run.remote(cfg_dict, e): rank for rank, (w, e) in enumerate(zip(workers, envs))}
        return _wait_all(futures, cfg, poll_s)[0]
    finally:
        for w in workers:
            ray.kill(w, no_restart=True)
        remove_placement_group(pg)
        if started_here:
            ray.shutdown()


def absolute_paths(tree: dict) -> dict:
    """The config with its local paths made absolute against the driver's directory: a runtime env's
    working_dir moves the workers' current directory, and the workers must read and write where the
    command line meant."""
    def fix(path):
        return path if path is None or "://" in str(path) or os.path.isabs(path) else os.path.abspath(path)

    data, model, tr = tree["data"], tree["actor_rollout_ref"]["model"], tree["trainer"]
    data["train_files"] = [fix(p) for p in data["train_files"]]
    data["val_files"] = [fix(p) for p in data["val_files"]]
    model["path"], model["tokenizer_path"] = fix(model["path"]), fix(model["tokenizer_path"])
    tr["default_local_dir"], tr["resume_from_path"] = fix(tr["default_local_dir"]), fix(tr["resume_from_path"])
    tree["custom_reward_function"]["path"] = fix(tree["custom_reward_function"]["path"])
    return tree


def _wait_all(futures: dict, cfg: MtprlConfig, poll_s: float) -> list[dict[str, float]]:
    """Results of every rank in rank order; the first failure raises :class:`WorkerFailed` at once
    (the caller kills the other ranks, which may be blocked in a collective with the dead one)."""
    import ray

    results: dict[int, dict] = {}
    pending = list(futures)
    while pending:
        done, pending = ray.wait(pending, num_returns=1, timeout=poll_s)
        for ref in done:
            rank = futures[ref]
            try:
                results[rank] = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - RayActorError (death) or the rank's own exception
                raise WorkerFailed(_failure_message(rank, e, cfg)) from None
    return [results[r] for r in sorted(results)]


def _failure_message(rank: int, error: BaseException, cfg: MtprlConfig) -> str:
    from mtprl.trainer.checkpoint import find_latest_checkpoint

    import ray

    last = find_latest_checkpoint(Path(cfg.trainer.default_local_dir))
    what = "died (killed, out of memory or crashed)" if isinstance(error, ray.exceptions.RayActorError) else "failed"
    lines = str(error).strip().splitlines()
    cause = lines[-1] if lines else type(error).__name__
    cause = cause.split(" Worker exit type:")[0]  # Ray's troubleshooting text after that is not ours to repeat
    return (f"rank {rank} {what}: {cause}. The other ranks were stopped. Last intact checkpoint: "
            f"{last or 'none'}; run the same command again to resume from it (trainer.resume_mode=auto).")


def wait_for(pred, timeout_s: float, poll_s: float = 0.1) -> bool:
    """Poll ``pred`` until it holds or ``timeout_s`` passes (for tests and launch checks)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(poll_s)
    return pred()
