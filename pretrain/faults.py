"""Fault injection for tests, driven by environment variables (all off by default).

- ``TWICING_FAULT_SAVE_PAUSE=STEP:S``: inside the checkpoint save of step STEP, sleep S seconds
  after the shards are written and before the completion marker (a window to SIGKILL a save).
- ``TWICING_FAULT_NAN_AT_STEP=N``: make rank 0's loss NaN at optimizer step N.
"""

from __future__ import annotations

import os
import time


def pause_in_save(step: int) -> None:
    spec = os.environ.get("TWICING_FAULT_SAVE_PAUSE")
    if not spec:
        return
    at, _, seconds = spec.partition(":")
    if int(at) == step:
        print(f"[fault] pausing {seconds}s inside the checkpoint save of step {step}", flush=True)
        time.sleep(float(seconds))


def nan_at_step(step: int, rank: int) -> bool:
    target = os.environ.get("TWICING_FAULT_NAN_AT_STEP")
    return target is not None and rank == 0 and int(target) == step
