"""Log lines on rank 0 and TensorBoard scalars."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from pretrain.train_config import LoggingConfig


def memory_gb() -> float:
    """Peak device memory (GPU) or resident set size (CPU) of this process, in GiB."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import psutil

    return psutil.Process(os.getpid()).memory_info().rss / 2**30


class Metrics:
    """Writes scalars to TensorBoard (rank 0) and prints compact log lines."""

    def __init__(self, cfg: LoggingConfig, run_dir: Path, rank: int):
        """Rank 0 appends to ``run_dir/metrics.jsonl`` and, with ``logging.tensorboard``, writes
        ``run_dir/tensorboard``."""
        self.rank = rank
        self.writer = None
        self.jsonl = run_dir / "metrics.jsonl" if rank == 0 else None
        if self.jsonl is not None:
            self.jsonl.parent.mkdir(parents=True, exist_ok=True)
        if cfg.tensorboard and rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def scalars(self, step: int, values: dict[str, float | None]) -> None:
        if self.writer is None:
            return
        for name, value in values.items():
            if value is not None:
                self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def record(self, entry: dict) -> None:
        """Append one JSON line (floats round-trip exactly) to the run's metrics file."""
        if self.jsonl is not None:
            with open(self.jsonl, "a") as f:
                f.write(json.dumps(entry) + "\n")

    def print(self, message: str) -> None:
        if self.rank == 0:
            print(message, flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
