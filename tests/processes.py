"""Test workers in fresh Python processes: the repository importable, one torch thread
(tiny models gain nothing from two, and lose 10x when threads fight a busy core), and no
distributed launcher variables inherited from the test process."""

from __future__ import annotations

import io
import os
import runpy
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER_VARIABLES = ("LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")


def worker_env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for variable in LAUNCHER_VARIABLES:
        env.pop(variable, None)
    return env


def exit_of_script(
    script: str, arguments: list[str], monkeypatch: pytest.MonkeyPatch
) -> tuple[object, str, str]:
    """A repository script run as __main__ in this process until it exits (its exit code,
    stdout and stderr): for arguments it refuses before any work, where a fresh process
    would spend seconds importing torch only to print the same refusal."""
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", [script, *arguments])
    with redirect_stdout(out), redirect_stderr(err), pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    return exit_info.value.code, out.getvalue(), err.getvalue()


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
    return ranks_command(2, script, *args)


def ranks_command(ranks: int, script: str, *args: str) -> list[str]:
    """torch.distributed.run of a repository script on `ranks` local processes."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={ranks}",
        f"--master-port={free_port()}",
        str(ROOT / script),
        *args,
    ]


@contextmanager
def gloo_group(port: int | None = None, rank: int = 0, world_size: int = 1) -> Iterator[None]:
    """A gloo process group in this process for the block (one rank unless told), then
    destroyed. Before destroying it, a pause: a gloo worker thread frees a finished
    collective's tensors after the caller's wait returns, and freeing one that Python
    made needs the GIL, which the process group's destructor holds while it waits for
    that worker. Seen once in CI on torch 2.7 (a DTensor full_tensor() then the
    teardown): both waited forever."""
    torch.distributed.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{free_port() if port is None else port}",
        rank=rank,
        world_size=world_size,
    )
    try:
        yield
    finally:
        time.sleep(0.2)  # without the GIL: the workers let go of their last tensors
        torch.distributed.destroy_process_group()
