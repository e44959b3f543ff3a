"""Drive the real Slurm sandbox (``../shared/slurm-sandbox``) from tests: submit, poll, find ranks.

Everything goes through the real client commands (sbatch, scontrol, scancel); nothing is mocked.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SLURM_DIR = ROOT / "slurm"
FINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
}
#: variables a job must not inherit from the test process (they would override the job's own)
_SCRUB = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def job_env(log_dir: Path, **extra: str) -> dict[str, str]:
    """The submitter's environment for a job: this venv first on PATH, one thread per rank."""
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB and not k.startswith("SLURM_")}
    env.update(
        PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}",
        TWICING_PYTHON=sys.executable,
        TWICING_LOG_DIR=str(log_dir),
        OMP_NUM_THREADS="1",
        DS_ACCELERATOR="cpu",
        SLURM_CONF=os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf"),
    )
    env.update(extra)
    return env


def sbatch(script: str, options: list[str], args: list[str], env: dict[str, str]) -> str:
    """Submit ``slurm/<script>`` unchanged from the repository root; returns the job id."""
    out = subprocess.run(
        ["sbatch", "--parsable", *options, str(SLURM_DIR / script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, f"sbatch failed: {out.stderr}"
    return out.stdout.strip().split(";")[0]


def job(jid: str) -> dict[str, str]:
    """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, Reason, ...)."""
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", jid], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout))


def wait_job(jid: str, timeout: float, restarts: int = 0, log: Path | None = None):
    """Poll until the job is in a final state after at least ``restarts`` requeues."""
    deadline = time.monotonic() + timeout
    info = job(jid)
    while time.monotonic() < deadline:
        info = job(jid)
        if info["JobState"] in FINAL and int(info.get("Restarts", 0)) >= restarts:
            return info
        time.sleep(0.5)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    raise AssertionError(f"job {jid} not finished after {timeout}s: {info}\n{tail}")


def wait_for(predicate, timeout: float, what: str, jid: str | None = None) -> float:
    """Poll ``predicate``; fails early if the job ended. Returns the time it became true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return time.monotonic()
        if jid and job(jid)["JobState"] in FINAL:
            if predicate():
                return time.monotonic()
            raise AssertionError(f"job {jid} ended while waiting for {what}: {job(jid)}")
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def rank_pid(jid: str, rank: int) -> int:
    """PID of the Python process of task ``rank`` of job ``jid`` (this host runs every node)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            if cmd[1:3] != [b"-m", b"pretrain.train"] or not re.search(rb"python[0-9.]*$", cmd[0]):
                continue
            env = dict(
                e.split("=", 1) for e in (proc / "environ").read_text().split("\0") if "=" in e
            )
        except (OSError, UnicodeDecodeError, IndexError):
            continue
        if env.get("SLURM_JOB_ID") == jid and env.get("SLURM_PROCID") == str(rank):
            return int(proc.name)
    raise AssertionError(f"no python process for rank {rank} of job {jid}")


@dataclass
class Sandbox:
    up: Path
    down: Path

    def start(self) -> None:
        out = subprocess.run(["bash", str(self.up)], capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, f"slurm-sandbox up.sh failed:\n{out.stdout}\n{out.stderr}"

    def stop(self) -> None:
        subprocess.run(["bash", str(self.down)], capture_output=True, text=True, timeout=300)
