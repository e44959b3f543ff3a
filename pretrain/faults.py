"""Fault injection for tests, driven by environment variables (all off by default).

- ``TWICING_FAULT_SAVE_PAUSE=STEP:S``: inside the checkpoint save of step STEP, sleep S seconds
  after the shards are written and before the completion marker (a window to SIGKILL a save).
- ``TWICING_FAULT_HOLD_BEFORE_STEP=STEP:S``: before optimizer step STEP runs, wait up to S
  seconds for a stop signal (a fixed point to signal or kill a run at, however fast it trains).
- ``TWICING_FAULT_NAN_AT_STEP=N``: make rank 0's loss NaN at optimizer step N (at pipeline
  parallel: that of the first rank of the last stage, where the loss is computed).
- ``TWICING_FAULT_SAVE_ERROR=N[:RANK]``: the first N checkpoint-file writes of this process (of
  rank RANK only, when given) fail with an I/O error (a transient storage fault).
- ``TWICING_FAULT_WRITER_HOLD=S``: a background checkpoint writer (``checkpoint.async_save``)
  holds every file S seconds between writing its temporary copy and renaming it into place (a
  window to kill a run while its writers are mid-file).
- ``TWICING_FAULT_HOST_MEMORY=BYTES``: a background save sees only BYTES of free host memory.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from pathlib import Path

_save_errors = 0


def pause_in_save(step: int) -> None:
    spec = os.environ.get("TWICING_FAULT_SAVE_PAUSE")
    if not spec:
        return
    at, _, seconds = spec.partition(":")
    if int(at) == step:
        print(f"[fault] pausing {seconds}s inside the checkpoint save of step {step}", flush=True)
        time.sleep(float(seconds))


def hold_before_step(step: int, stopped: Callable[[], bool]) -> None:
    spec = os.environ.get("TWICING_FAULT_HOLD_BEFORE_STEP")
    if not spec:
        return
    at, _, seconds = spec.partition(":")
    if int(at) != step:
        return
    print(f"[fault] holding before step {step} for up to {seconds}s", flush=True)
    deadline = time.monotonic() + float(seconds)
    while not stopped() and time.monotonic() < deadline:
        time.sleep(0.05)


def nan_at_step(step: int, rank: int) -> bool:
    target = os.environ.get("TWICING_FAULT_NAN_AT_STEP")
    return target is not None and rank == 0 and int(target) == step


def save_error(path: Path) -> None:
    """Raise ``OSError(EIO)`` for the first N checkpoint writes (``TWICING_FAULT_SAVE_ERROR``)."""
    global _save_errors
    spec = os.environ.get("TWICING_FAULT_SAVE_ERROR")
    if not spec:
        return
    count, _, rank = spec.partition(":")
    if rank and os.environ.get("RANK", "0") != rank:
        return
    if _save_errors < int(count):
        _save_errors += 1
        raise OSError(errno.EIO, "injected I/O error", str(path))


def hold_writer(path: Path) -> None:
    spec = os.environ.get("TWICING_FAULT_WRITER_HOLD")
    if spec:
        print(f"[fault] writer holding {path} for {spec}s", flush=True)
        time.sleep(float(spec))


def host_memory(available: int) -> int:
    """``TWICING_FAULT_HOST_MEMORY=BYTES``: pretend only BYTES of host memory are available (to
    exercise the synchronous fallback of a background save)."""
    spec = os.environ.get("TWICING_FAULT_HOST_MEMORY")
    return int(spec) if spec else available
