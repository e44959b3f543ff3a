"""The one wrapper every command runs its body in: project exceptions become exit codes.

A ``ConfigError`` (or data_prep's ``DataPrepError``) exits 2, a ``CheckpointError`` 4, a
``NonFiniteError`` 3, each with one line naming the culprit and no traceback; anything else
prints its traceback and exits 1. Known-harmless third-party warnings are silenced first
(``data_prep.base.warning_filters``). Imports nothing heavy.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable

from data_prep.base.errors import (
    CheckpointError,
    ConfigError,
    DataPrepError,
    ExitCode,
    NonFiniteError,
)
from data_prep.base.warning_filters import quiet_known_warnings

_LABELS = {
    ConfigError: "config error",
    CheckpointError: "checkpoint error",
    NonFiniteError: "halted",
}


def run_cli(prog: str, body: Callable[[], int | None], prefix: str = "") -> int:
    """Run ``body`` and return its exit code; ``prefix`` (e.g. ``[rank 1] ``) starts messages."""
    quiet_known_warnings()
    try:
        return int(body() or 0)
    except (ConfigError, CheckpointError, NonFiniteError) as e:
        label = next(v for k, v in _LABELS.items() if isinstance(e, k))
        print(f"{prefix}{prog}: {label}: {e}", file=sys.stderr, flush=True)
        return int(e.exit_code)
    except DataPrepError as e:
        print(f"{prefix}{prog}: data error: {e}", file=sys.stderr, flush=True)
        return int(ExitCode.CONFIG)
    except Exception:
        traceback.print_exc()
        print(f"{prefix}{prog}: failed", file=sys.stderr, flush=True)
        return int(ExitCode.ERROR)
