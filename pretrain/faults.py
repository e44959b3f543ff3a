"""Fault injection for tests, driven by environment variables (all off by default).

- ``TWICING_FAULT_SAVE_PAUSE=S``: sleep S seconds inside a checkpoint save, after the shards are
  written and before the completion marker (a window to SIGKILL a save mid-way).
- ``TWICING_FAULT_NAN_AT_STEP=N``: make rank 0's loss NaN at optimizer step N.
"""

from __future__ import annotations

import os
import time


def pause_in_save() -> None:
    seconds = float(os.environ.get("TWICING_FAULT_SAVE_PAUSE", "0") or 0)
    if seconds > 0:
        print(f"[fault] pausing {seconds}s inside checkpoint save", flush=True)
        time.sleep(seconds)


def nan_at_step(step: int, rank: int) -> bool:
    target = os.environ.get("TWICING_FAULT_NAN_AT_STEP")
    return target is not None and rank == 0 and int(target) == step
