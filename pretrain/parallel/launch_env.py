"""Who am I in the job: rank, world size and rendezvous from torchrun, srun or deepspeed."""

from __future__ import annotations

import os
import random
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from data_prep.base.errors import ConfigError


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str

    def export(self) -> None:
        """Publish the torch.distributed variables (for launchers that only set SLURM_*)."""
        os.environ.update(
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_RANK=str(self.local_rank),
            MASTER_ADDR=self.master_addr,
            MASTER_PORT=str(self.master_port),
        )


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise ConfigError(f"environment variable {key}={env[key]!r} is not an integer") from None


def launch_env(env: Mapping[str, str] = os.environ) -> LaunchEnv:
    """torch variables (torchrun, deepspeed launcher) win; else SLURM_* (``srun``); else 1 rank."""
    if "RANK" in env and "WORLD_SIZE" in env:
        launcher = "torch"
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        launcher = "slurm"
        rank, world = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS")
        local = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
    else:
        launcher, rank, world, local = "single", 0, 1, 0
    if not 0 <= rank < world:
        raise ConfigError(f"rank {rank} is outside world size {world}")
    if world > 1 and "MASTER_ADDR" not in env:
        raise ConfigError(
            f"MASTER_ADDR is not set for a {world}-rank {launcher} job; under Slurm export "
            'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1) (the '
            "project's slurm/pretrain.sbatch does)"
        )
    addr = env.get("MASTER_ADDR", "127.0.0.1")
    port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else 29500
    return LaunchEnv(rank, world, local, addr, port, launcher)


def _ephemeral_ports() -> tuple[int, int]:
    """The range the kernel takes local ports of outgoing connections from."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999  # Linux's default
    return low, high


def free_port() -> int:
    """A TCP port free on this host right now (for a rendezvous on one machine), outside the
    ephemeral range: a port the kernel picked for ``bind(0)`` can be handed to some outgoing
    connection (gloo opens many) before the rendezvous binds it, which then fails with
    EADDRINUSE. Below the range only listeners compete, and the port is checked free."""
    low, high = _ephemeral_ports()
    span = range(max(1024, low - 12000), low) if low > 2048 else range(high + 1, 65536)
    pick = random.SystemRandom()  # leaves the seeded global ``random`` alone
    for _ in range(64):
        port = pick.choice(span)
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # everything tried was taken: let the kernel choose
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
