"""Helpers to run a script as N ranks of a gloo process group (what torchrun does), one thread each."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: Path | str, world_size: int, *args: str, timeout: float = 240, env: dict | None = None,
           check: bool = True) -> list[subprocess.CompletedProcess]:
    """Run ``script`` (a file, or "-m module") as ``world_size`` ranks (RANK / WORLD_SIZE / MASTER_* set, as
    torchrun sets them); returns each rank's result."""
    port = free_port()
    procs = []
    for rank in range(world_size):
        e = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                 LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                 OMP_NUM_THREADS="1", **(env or {}))
        if world_size == 1:
            for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
                e.pop(k)
        head = str(script).split() if str(script).startswith("-m ") else [str(script)]
        procs.append(subprocess.Popen([sys.executable, *head, *args], env=e, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    results = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, ""))
    if check:
        for rank, r in enumerate(results):
            assert r.returncode == 0, f"rank {rank} failed:\n{r.stdout[-4000:]}"
    return results


@pytest.fixture
def launch_ranks():
    return launch


@pytest.fixture
def free_tcp_port() -> int:
    return free_port()
