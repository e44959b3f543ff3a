"""The write failures of one checkpoint save on this rank, recorded instead of raised."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pretrain import faults


class SaveErrors:
    """The write failures of one save on this rank, recorded instead of raised, so that every
    rank still runs the save's collectives and all can agree on the outcome. Every write of a
    save goes through it: ours (``guard(path, write)``) and DeepSpeed's
    (``deepspeed_compat.route_save_writes``). After the first failure the remaining writes are
    skipped (this rank's disk already failed)."""

    def __init__(self) -> None:
        self.errors: list[tuple[str, BaseException]] = []

    def __call__(self, path: Path | str, write: Callable[[], Any], inject: bool = True) -> None:
        if self.errors:
            return
        try:
            if inject:
                faults.save_error(Path(path))
            write()
        except Exception as e:  # noqa: BLE001 - agreed on across ranks by the manager
            self.errors.append((str(path), e))

    def save_state(self, path: Path | str, state_dict: Any, save: Callable[[Any, str], None]):
        """DeepSpeed's ``checkpoint_engine.save(state_dict, path)``, written now."""
        self(path, lambda: save(state_dict, str(path)))
