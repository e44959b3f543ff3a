"""SIGTERM / SIGUSR1 → finish the step, checkpoint, exit with ``ExitCode.RESUMABLE`` (75)."""

from __future__ import annotations

import signal


class StopRequest:
    """Remembers that a stop signal arrived; the loop agrees on it across ranks each step."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.signum: int | None = None

    def install(self) -> None:
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None
