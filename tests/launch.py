"""Start N real processes of a script with torch.distributed's environment variables set."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import forkserver

from pretrain.parallel.launch_env import free_port

ROOT = Path(__file__).resolve().parents[1]


def _scratch_log() -> Path:
    fd, name = tempfile.mkstemp(prefix="rank-", suffix=".log")
    os.close(fd)
    return Path(name)


def launch(
    argv: Sequence[str],
    nprocs: int,
    *,
    env: dict[str, str] | None = None,
    cwd: Path | str = ROOT,
    log_dir: Path | None = None,
    fresh: bool = False,
) -> list[subprocess.Popen]:
    """Start ``nprocs`` copies of ``python argv...`` as ranks 0..n-1 on one host: forked from
    the pre-warmed test server (``forkserver``), or, with ``fresh``, as new interpreters (for
    what happens while a rank is still importing)."""
    port = str(free_port())
    procs = []
    for rank in range(nprocs):
        penv = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(nprocs),
            "LOCAL_WORLD_SIZE": str(nprocs),
            "OMP_NUM_THREADS": "1",
            "DS_ACCELERATOR": "cpu",
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        if forkserver.enabled() and not fresh:
            log = log_dir / f"rank{rank}.log" if log_dir else _scratch_log()
            procs.append(forkserver.Rank(argv, penv, cwd, log, keep_log=log_dir is not None))
            continue
        out = open(log_dir / f"rank{rank}.log", "w") if log_dir else subprocess.PIPE  # noqa: SIM115
        procs.append(
            subprocess.Popen(
                [sys.executable, *argv],
                env=penv,
                cwd=cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    return procs


def run(
    argv: Sequence[str],
    nprocs: int,
    *,
    timeout: float = 300,
    env: dict[str, str] | None = None,
    log_dir: Path | None = None,
    check: bool = True,
) -> list[tuple[int, str]]:
    """Run ``nprocs`` ranks to completion; returns ``[(returncode, output)]`` per rank.

    With ``check``, any non-zero exit raises with every rank's output tail.
    """
    procs = launch(argv, nprocs, env=env, log_dir=log_dir)
    results = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            if log_dir:
                out = (log_dir / f"rank{len(results)}.log").read_text()
            results.append((p.returncode, out or ""))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if check and any(rc != 0 for rc, _ in results):
        tails = "\n".join(
            f"--- rank {i} (exit {rc}) ---\n{out[-4000:]}" for i, (rc, out) in enumerate(results)
        )
        raise AssertionError(f"{' '.join(argv)} failed:\n{tails}")
    return results


def run_command(
    argv: Sequence[str], env: dict[str, str], *, cwd: Path | str = ROOT, timeout: float = 300
) -> tuple[int, str]:
    """One process of ``python argv`` with exactly ``env``; ``(exit code, stdout + stderr)``."""
    if forkserver.enabled():
        rank = forkserver.Rank(list(argv), env, cwd, _scratch_log(), keep_log=False)
        try:
            out, _ = rank.communicate(timeout=timeout)
        finally:
            rank.kill()
        return rank.returncode, out  # type: ignore[return-value]
    p = subprocess.run(
        [sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    return p.returncode, p.stdout + p.stderr
