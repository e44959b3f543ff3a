"""Run N ranks on this machine, like ``torchrun --standalone`` but exit-code transparent.

``python -m pretrain.local_launch --nproc 2 -m pretrain.train --config configs/demo.yaml``

torchrun turns any non-zero worker exit into its own failure; this launcher returns the ranks'
common exit code (so 75, "checkpointed, resume me", survives), forwards SIGINT/SIGTERM/SIGUSR1
to every rank, and stops the others when one fails.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from data_prep.base.errors import ExitCode
from pretrain.parallel.launch_env import free_port


def launch(nproc: int, command: list[str], grace_s: float = 30.0) -> int:
    port = str(free_port())
    procs: list[subprocess.Popen] = []
    for rank in range(nproc):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(nproc),
            "LOCAL_WORLD_SIZE": str(nproc),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
        }
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
        procs.append(subprocess.Popen([sys.executable, *command], env=env))

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, forward)
    codes: dict[int, int] = {}
    failed_at = None
    while len(codes) < nproc:
        for i, p in enumerate(procs):
            if i not in codes and p.poll() is not None:
                codes[i] = p.returncode
                if p.returncode not in (ExitCode.OK, ExitCode.RESUMABLE) and failed_at is None:
                    failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > grace_s:
            for i, p in enumerate(procs):
                if i not in codes:
                    p.kill()
        time.sleep(0.1)
    nonzero = [c for c in codes.values() if c != ExitCode.OK]
    if not nonzero:
        return ExitCode.OK
    hard = [c for c in nonzero if c != ExitCode.RESUMABLE]
    return hard[0] if hard else ExitCode.RESUMABLE


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = (
        "usage: python -m pretrain.local_launch --nproc N [--] <python args: -m pretrain.train ...>"
    )
    if argv and argv[0].startswith("--nproc="):
        argv = ["--nproc", argv[0].split("=", 1)[1], *argv[1:]]
    if len(argv) < 3 or argv[0] != "--nproc" or not argv[1].isdigit() or int(argv[1]) < 1:
        print(usage, file=sys.stderr)
        return ExitCode.CONFIG
    command = argv[2:]
    if command[0] == "--":
        command = command[1:]
    return launch(int(argv[1]), command)


if __name__ == "__main__":
    sys.exit(main())
