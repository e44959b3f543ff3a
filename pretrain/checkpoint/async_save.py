"""One rank's share of a non-blocking checkpoint save (``checkpoint.async_save: true``).

The save itself stays collective and short: DeepSpeed's ``save_checkpoint`` runs as always, but
every file it (and the checkpoint manager) would write is *recorded* here instead: its path and
its state dict, with containers copied and tensors referenced. Then a background thread

1. **stages** the tensors: one copy of every distinct storage into host buffers that are reused
   from save to save (pinned memory on CUDA), views and storage sharing preserved, so the file
   torch writes is the one it would have written from the live tensors;
2. writes each file as the synchronous path does (the same ``torch.save`` call of DeepSpeed's
   checkpoint engine, to a temporary name renamed into place), retrying a transient failure
   ``save_retries`` times (never a full disk), and digests it (size + xxh3-128).

Training goes on meanwhile. Nothing a save records changes before the next optimizer update
(forward and backward only read parameters and optimizer state), so the trainer calls
:meth:`StagedSave.wait_staged` just before that update; staging normally finished during the
step's forward and backward. The step directory becomes ``COMPLETE`` and ``latest`` only when
every rank's writer is done and the digests are agreed (``CheckpointManager.poll``).

Bytes staged per parameter on the ranks that write it (fp32 training; see docs/checkpoints.md):
model states 4 (written by DP rank 0 of each model-parallel shard), Adam's two moments 8 plus
the fp32 master copy 4 (ZeRO-1/2/3: that is 12 / DP per parameter; ZeRO-0: the moments, 8, on
every rank).
"""

from __future__ import annotations

import contextlib
import copy
import errno
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from data_prep.base.atomic_write import TMP_TAG
from pretrain import faults
from pretrain.checkpoint.layout import file_digest
from pretrain.checkpoint.save_errors import SaveErrors


@dataclass
class _File:
    path: Path
    staged: Callable[[Path], None]  #: writes the file from the staged copy to a (temporary) path
    direct: Callable[[Path], None]  #: writes it from the live objects (the synchronous fallback)


class StagingPool:
    """Host buffers reused from one save to the next (keyed by file and storage order), so a
    save copies into memory that is already mapped instead of faulting in fresh pages."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, int], torch.UntypedStorage] = {}

    def get(self, key: tuple[str, int], nbytes: int) -> torch.UntypedStorage:
        buf = self.buffers.get(key)
        if buf is None or buf.nbytes() != nbytes:
            pin = torch.cuda.is_available()
            buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin).untyped_storage()
            self.buffers[key] = buf
        return buf

    def nbytes(self) -> int:
        return sum(b.nbytes() for b in self.buffers.values())


class StagedSave(SaveErrors):
    """Recorded files of one save on this rank, then staged and written in the background."""

    def __init__(self, tag_dir: Path, pool: StagingPool, fsync: bool, retries: int) -> None:
        self.tag_dir = tag_dir
        self.pool = pool
        self.fsync = fsync
        self.retries = retries
        self.files: list[_File] = []
        self.copies: list[tuple[torch.UntypedStorage, torch.UntypedStorage]] = []
        super().__init__()
        self.digests: dict[str, dict[str, Any]] = {}
        self.staged = threading.Event()
        self.done = threading.Event()
        self.bytes_written = 0
        self.write_seconds = 0.0
        #: seconds training waited for staging (``wait_staged``)
        self.staging_waited = 0.0
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ recording (sync)
    # small writes (a directory, the recovery script) run now through SaveErrors.__call__
    def save_state(self, path: Path | str, state_dict: Any, save: Callable[[Any, str], None]):
        """DeepSpeed's ``checkpoint_engine.save(state_dict, path)``: record a staged copy."""
        key = str(Path(path).relative_to(self.tag_dir))
        seen: dict[tuple[int, int], torch.UntypedStorage] = {}
        staged = _stage_tree(state_dict, lambda s: self._buffer_for(key, s, seen))
        self.files.append(
            _File(
                Path(path),
                lambda tmp: save(staged, str(tmp)),
                lambda tmp: save(state_dict, str(tmp)),
            )
        )

    def save_tensors(self, path: Path, obj: Any) -> None:
        """A ``torch.save`` file of ours (the RNG states): staged the same way."""
        self.save_state(path, obj, lambda o, p: torch.save(o, p))

    def save_bytes(self, path: Path, data: bytes) -> None:
        """A small file of ours (trainer state, tokenizer): its bytes, as they are now."""
        write = lambda tmp: Path(tmp).write_bytes(data)  # noqa: E731
        self.files.append(_File(Path(path), write, write))

    def _buffer_for(self, key: str, src: torch.UntypedStorage, seen: dict) -> Any:
        ident = (src.data_ptr(), src.nbytes())
        if ident not in seen:
            dst = self.pool.get((key, len(seen)), src.nbytes())
            seen[ident] = dst
            self.copies.append((src, dst))
        return seen[ident]

    def staged_bytes(self) -> int:
        return sum(dst.nbytes() for _, dst in self.copies)

    # ------------------------------------------------------------------ writing
    def start(self) -> None:
        """Stage and write in a background thread."""
        self._thread = threading.Thread(target=self.run, name="checkpoint-writer", daemon=True)
        self._thread.start()

    def write_now(self) -> None:
        """The synchronous fallback (too little host memory to stage): write every file from the
        live objects in the caller's thread; nothing is copied."""
        self.copies.clear()
        self.staged.set()
        self._write_all(direct=True)

    def run(self) -> None:
        """Stage, then write every file (the background thread's body)."""
        try:
            for src, dst in self.copies:
                dst.copy_(src)
            self.copies.clear()  # the live storages are no longer needed
        except Exception as e:  # noqa: BLE001
            self.errors.append((str(self.tag_dir), e))
        finally:
            self.staged.set()
        self._write_all(direct=False)

    def _write_all(self, direct: bool) -> None:
        t0 = time.perf_counter()
        try:
            for f in self.files:
                if self.errors:
                    break
                self._write_with_retries(f, f.direct if direct else f.staged)
        finally:
            self.write_seconds = time.perf_counter() - t0
            self.done.set()

    def _write_with_retries(self, f: _File, write: Callable[[Path], None]) -> None:
        for attempt in range(self.retries + 1):
            try:
                faults.save_error(f.path)
                self._write(f.path, write)
                return
            except Exception as e:  # noqa: BLE001 - agreed on across ranks by the manager
                nospace = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
                if nospace or attempt == self.retries:
                    self.errors.append((str(f.path), e))
                    return
                time.sleep(min(2.0 * 2**attempt, 60.0))

    def _write(self, path: Path, write: Callable[[Path], None]) -> None:
        # a temporary directory beside it, the file under its own name (torch.save names the
        # archive inside after the file: the bytes are those of a direct write)
        tmp_dir = path.parent / f"{TMP_TAG}{os.getpid()}"
        tmp = tmp_dir / path.name
        tmp_dir.mkdir(parents=True, exist_ok=True)
        try:
            write(tmp)
            faults.hold_writer(path)
            if self.fsync:
                with open(tmp, "rb+") as fh:
                    os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            with contextlib.suppress(OSError):
                tmp_dir.rmdir()
        digest = file_digest(path)
        self.digests[str(path.relative_to(self.tag_dir))] = digest
        self.bytes_written += digest["size"]

    def wait_staged(self) -> float:
        """Block until the tensors are copied; the seconds it waited."""
        t0 = time.perf_counter()
        self.staged.wait()
        waited = time.perf_counter() - t0
        self.staging_waited += waited
        return waited

    def wait_done(self) -> float:
        t0 = time.perf_counter()
        self.done.wait()
        return time.perf_counter() - t0


def _stage_tree(obj: Any, buffer_for: Callable[[torch.UntypedStorage], Any]) -> Any:
    """``obj`` with its containers copied, every tensor replaced by a same-shaped view of the
    staging buffer of its storage (filled later), and other leaves deep-copied (they are small:
    hyperparameters, scaler objects, the DeepSpeed config)."""
    if isinstance(obj, torch.Tensor):
        src = obj.untyped_storage()
        dst = buffer_for(src)
        out = torch.empty(0, dtype=obj.dtype)
        return out.set_(dst, obj.storage_offset(), obj.size(), obj.stride())
    if isinstance(obj, dict):
        return type(obj)((k, _stage_tree(v, buffer_for)) for k, v in obj.items())
    if isinstance(obj, list | tuple) and not hasattr(obj, "_fields"):
        return type(obj)(_stage_tree(v, buffer_for) for v in obj)
    return copy.deepcopy(obj)
