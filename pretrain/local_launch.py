"""Run N ranks on this machine, like ``torchrun --standalone`` but exit-code transparent.

``python -m pretrain.local_launch --nproc 2 -m pretrain.train --config configs/demo.yaml``

torchrun turns any non-zero worker exit into its own failure; this launcher returns the ranks'
common exit code (so 75, "checkpointed, resume me", survives), forwards SIGINT/SIGTERM/SIGUSR1
to every rank, and stops the others when one fails.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
                if p.returncode not in (0, 75) and failed_at is None:
                    failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > grace_s:
            for i, p in enumerate(procs):
                if i not in codes:
                    p.kill()
        time.sleep(0.1)
    nonzero = [c for c in codes.values() if c != 0]
    if not nonzero:
        return 0
    hard = [c for c in nonzero if c != 75]
    return hard[0] if hard else 75


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nproc", type=int, required=True)
    parser.add_argument(
        "command", nargs=argparse.REMAINDER, help="python arguments, e.g. -m pretrain.train ..."
    )
    args = parser.parse_args(argv)
    if args.nproc < 1 or not args.command:
        parser.error("need --nproc >= 1 and a command")
    command = args.command[1:] if args.command[0] == "--" else args.command
    return launch(args.nproc, command)


if __name__ == "__main__":
    sys.exit(main())
