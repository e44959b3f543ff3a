"""SIGTERM / SIGUSR1 → finish the step, checkpoint, exit with :data:`EXIT_RESUMABLE`."""

from __future__ import annotations

import signal

#: finished every configured step
EXIT_DONE = 0
#: stopped early after writing a complete checkpoint (signal, exit_at_step): resume me
EXIT_RESUMABLE = 75
#: halted on a non-finite loss or gradient (policy ``halt``); nothing was checkpointed
EXIT_NONFINITE = 3


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
