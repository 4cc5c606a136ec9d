"""Test workers in fresh Python processes: the repository importable, one torch thread
(tiny models gain nothing from two, and lose 10x when threads fight a busy core), and no
distributed launcher variables inherited from the test process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER_VARIABLES = ("LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")


def worker_env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for variable in LAUNCHER_VARIABLES:
        env.pop(variable, None)
    return env


def run_worker(command: list[str], timeout: float = 900) -> subprocess.CompletedProcess:
    """Run command from the repository root; fail the test with its stderr unless it exits 0."""
    result = subprocess.run(
        command, cwd=ROOT, env=worker_env(), capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def kill_when_printed(command: list[str], line: str, timeout: float = 600) -> None:
    """Start command and SIGKILL it as soon as it prints line; fail if it ends otherwise."""
    process = subprocess.Popen(
        command, cwd=ROOT, env=worker_env(), stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    for printed in process.stdout:
        if printed.strip() == line:
            process.send_signal(signal.SIGKILL)
            break
    process.wait(timeout=timeout)
    assert process.returncode == -signal.SIGKILL, f"the run must be killed at {line!r}, not end"


def free_port() -> int:
    """A port nothing on this machine listens on now (for a gloo rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_rank_command(script: str, *args: str) -> list[str]:
    """torch.distributed.run of a repository script on 2 local processes."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node=2",
        f"--master-port={free_port()}",
        str(ROOT / script),
        *args,
    ]
