"""One job per run directory: an exclusive lock that rank 0 holds for the job's life.

``<run_dir>/.lock`` is locked with ``flock`` (released by the kernel when the holder exits, also
after SIGKILL) and records the holder (pid, host, start time) for the message a second job
prints; a clean exit empties the record, so a record found beside a free lock is a dead job's
(taken over with a warning). On a file system without ``flock`` the record alone decides: a
holder on this host whose pid is gone is stale; one on another host is trusted to be alive (the
message names the file to delete).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import IO, Any

from data_prep.base.errors import ConfigError

LOCK = ".lock"


class RunDirBusy(ConfigError):
    """Another live job holds the run directory; the message names it."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(holder: dict[str, Any]) -> str:
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "?"
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} (since {when})"


class RunLock:
    """Hold ``run_dir/.lock`` until :meth:`release` (or the process ends)."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK
        self._file: IO[str] | None = None

    def _holder(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def acquire(self) -> None:
        """Take the lock or raise ``RunDirBusy`` naming the holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")  # noqa: SIM115 - held for the job's life
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder()
            f.close()
            raise RunDirBusy(
                f"run_dir {self.path.parent} is in use by another job: {_describe(holder)} holds "
                f"{self.path}. Wait for it to finish (or stop it) before starting this one"
            ) from None
        except OSError:  # no flock on this file system: judge by the record
            self._check_record()
        else:
            previous = self._holder()
            if previous:
                print(
                    f"warning: {self.path}: the previous job ({_describe(previous)}) ended "
                    "without releasing the run directory (killed?); taking it over",
                    file=sys.stderr,
                    flush=True,
                )
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        f.seek(0)
        f.truncate()
        f.write(json.dumps(me))
        f.flush()
        self._file = f

    def _check_record(self) -> None:
        holder = self._holder()
        if not holder or holder.get("pid") == os.getpid():
            return
        if holder.get("host") == socket.gethostname() and not _alive(int(holder.get("pid", 0))):
            print(
                f"warning: {self.path}: taking over the stale lock of {_describe(holder)} "
                "(that process is gone)",
                file=sys.stderr,
            )
            return
        raise RunDirBusy(
            f"run_dir {self.path.parent} is in use by another job: {_describe(holder)} holds "
            f"{self.path} (this file system has no flock; delete the file if that job is dead)"
        )

    def release(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.seek(0)
                self._file.truncate()
                fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None
