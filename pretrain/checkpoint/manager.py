"""Save and restore a DeepSpeed engine plus our state, collectively on every rank (the layout
is ``pretrain.checkpoint.layout``)."""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from data_prep.base import atomic_write
from data_prep.base.errors import CheckpointError
from pretrain import faults
from pretrain.checkpoint import reshard
from pretrain.checkpoint.async_save import StagedSave, StagingPool
from pretrain.checkpoint.layout import (
    CHECKSUMS,
    LATEST,
    MARKER,
    STATE,
    complete_tags,
    file_digest,
    is_tag,
    latest_complete,
    read_checksums,
    read_state,
    step_of,
    tag_names,
    tag_of,
    torch_save,
    verify_files,
)
from pretrain.checkpoint.resume import plan_resume
from pretrain.checkpoint.save_errors import SaveErrors
from pretrain.checkpoint.state import TokenizerInfo, Topology, TrainerState
from pretrain.parallel import distributed
from pretrain.parallel.deepspeed_compat import (
    fix_zero3_universal_load,
    route_save_writes,
    safe_loads,
    universal_loading,
)
from pretrain.train_config import CheckpointConfig


@dataclass
class Loaded:
    """What a resume restored: the tag, its trainer state, and this rank's RNG states (None when
    they must not be restored: the checkpoint was saved at another layout, whose ranks had other
    roles)."""

    tag: str
    state: TrainerState
    rng: dict[str, Any] | None


class CheckpointManager:
    """Saves and restores a DeepSpeed engine plus our state, collectively on every rank, as the
    run's ``checkpoint`` config section says."""

    def __init__(self, root: Path, cfg: CheckpointConfig):
        self.root = Path(root)
        self.cfg = cfg
        self.keep_last = cfg.keep_last
        self.verify = cfg.verify
        self.fsync = cfg.fsync
        self.trust_pickles = cfg.trust_pickles
        self.save_retries = cfg.save_retries
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        #: the save being written in the background (``checkpoint.async_save``), if any
        self.pending: StagedSave | None = None
        self._pending_need = 0
        self._pool = StagingPool()

    # ---------------------------------------------------------------- save
    def save(
        self,
        engine,
        step: int,
        state: TrainerState,
        rng_state: dict[str, Any],
        files: dict[str, Path] | None = None,
        estimate_bytes: int = 0,
    ) -> Path:
        """Collective save; ``files`` (name → source) are copied into the checkpoint by rank 0.

        Refused up front when the file system has less room than the last checkpoint took. A
        write that fails on any rank (disk full, I/O error) is caught there and agreed on by
        every rank after DeepSpeed's collectives; the partial step directory is removed, and the
        save is retried ``save_retries`` times unless the disk is full. Then a
        ``CheckpointError`` on every rank says where and how much room it needed (the last
        size, or ``estimate_bytes`` before the first save); the previous complete checkpoint
        and ``latest`` are untouched."""
        if self.pending is not None:  # at most one save in flight
            self.finish(why=f"before saving {tag_of(step)}")
        need = self._preflight(estimate_bytes)
        if self.cfg.async_save:
            return self._save_async(engine, step, state, rng_state, files, need)
        tag_dir = self.root / tag_of(step)
        for attempt in range(self.save_retries + 1):
            try:
                failure = self._attempt(engine, step, state, rng_state, files, need)
            except Exception as e:  # noqa: BLE001 - outside the agreed paths: this rank only
                raise self._save_failed(tag_dir, e, need) from None
            if failure is None:
                return tag_dir
            rank, path, error, nospace, free = failure
            if nospace:
                raise self._failure_error(failure, tag_dir, need, attempt + 1)
            if attempt < self.save_retries:
                wait = min(2.0 * 2**attempt, 60.0)
                if self.rank == 0:
                    print(
                        f"[ckpt] save of {tag_dir} failed on rank {rank} ({error}, writing "
                        f"{path}); retrying in {wait:.0f}s (checkpoint.save_retries="
                        f"{self.save_retries})",
                        flush=True,
                    )
                time.sleep(wait)
                continue
            raise self._failure_error(failure, tag_dir, need, attempt + 1)
        raise AssertionError("unreachable")

    def _failure_error(
        self, failure: tuple[int, str, str, bool, int], tag_dir: Path, need: int, attempts: int
    ) -> CheckpointError:
        """The error every rank raises for an agreed failure (the partial directory is gone)."""
        rank, path, error, nospace, free = failure
        kept = self._kept()
        if nospace:
            return CheckpointError(
                f"checkpoint save failed: no space left on {self.root} (needed ~"
                f"{_mb(need)} MB, {_mb(free)} MB free; rank {rank} writing {path}); "
                f"removed the partial {tag_dir}; {kept}"
            )
        return CheckpointError(
            f"checkpoint save of {tag_dir} failed on rank {rank}: {error} (writing {path}); "
            f"{attempts} attempt(s) (checkpoint.save_retries={self.save_retries}); "
            f"removed the partial directory; {kept}"
        )

    # ---------------------------------------------------------------- background saves
    def _save_async(
        self,
        engine,
        step: int,
        state: TrainerState,
        rng_state: dict[str, Any],
        files: dict[str, Path] | None,
        need: int,
    ) -> Path:
        """Record this rank's files (DeepSpeed's collectives run as always), then stage and write
        them in the background; the step becomes ``COMPLETE`` in :meth:`poll`. Falls back to
        writing now, with a warning, when some rank lacks the host memory to stage its share."""
        tag_dir = self.root / tag_of(step)
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if tag_dir.exists():  # a stale partial save of this step, or a re-save
                shutil.rmtree(tag_dir)
        dist.barrier()
        staged = StagedSave(tag_dir, self._pool, self.fsync, self.save_retries)
        with route_save_writes(engine, staged):
            engine.save_checkpoint(
                str(self.root), tag=tag_of(step), client_state=self._client_state(state),
                save_latest=False,
            )  # fmt: skip
        staged.save_tensors(tag_dir / "rng" / f"rank_{self.rank:05d}.pt", rng_state)
        if self.rank == 0:
            text = json.dumps(state.to_json(), indent=1, sort_keys=True)
            staged.save_bytes(tag_dir / STATE, text.encode())
            for name, source in (files or {}).items():
                staged.save_bytes(tag_dir / name, Path(source).read_bytes())
        free = _host_memory_available()
        short = distributed.any_rank(staged.staged_bytes() > 0.9 * free)
        self.pending, self._pending_need = staged, need
        if short:
            if self.rank == 0:
                print(
                    f"[ckpt] warning: too little host memory to stage {tag_dir.name} "
                    f"({_mb(staged.staged_bytes())} MB on this rank, {_mb(free)} MB available "
                    "on some rank): writing it synchronously this time",
                    flush=True,
                )
            staged.write_now()
            self.finish()
        else:
            staged.start()
        return tag_dir

    def before_update(self) -> None:
        """Call before the optimizer changes parameters: waits until the save in flight has
        copied the tensors it saves (normally long done)."""
        if self.pending is not None:
            waited = self.pending.wait_staged()
            if waited > 0.05 and self.rank == 0:
                print(
                    f"[ckpt] waited {waited:.2f}s for {self.pending.tag_dir.name} to be staged "
                    "before the optimizer step",
                    flush=True,
                )

    def poll(self) -> None:
        """At a step boundary, on every rank: make the save in flight ``COMPLETE`` (and
        ``latest``) once every rank's writer is done, or raise its agreed failure."""
        if self.pending is None:
            return
        if distributed.any_rank(not self.pending.done.is_set()):
            return
        self._finalize()

    def finish(self, why: str = "") -> None:
        """Wait for the save in flight, then finalize it (every rank)."""
        if self.pending is None:
            return
        waited = self.pending.wait_done()
        if why and waited > 0.05 and self.rank == 0:
            print(
                f"[ckpt] waited {waited:.2f}s {why} for the background save of "
                f"{self.pending.tag_dir.name} to finish (one save in flight at a time)",
                flush=True,
            )
        self._finalize()

    def _finalize(self) -> None:
        staged, need = self.pending, self._pending_need
        assert staged is not None
        self.pending = None
        tag_dir = staged.tag_dir
        failure = self._agree(staged, need)
        if failure is None:
            gathered: list[dict] = [{} for _ in range(self.world)]
            dist.all_gather_object(gathered, staged.digests)
            guard = SaveErrors()
            if self.rank == 0:
                guard(tag_dir, lambda: self._mark_complete(tag_dir, gathered))
            failure = self._agree(guard, need)
        if failure is not None:
            if self.rank == 0:
                latest = self.root / LATEST
                if not (latest.is_file() and latest.read_text().strip() == tag_dir.name):
                    shutil.rmtree(tag_dir, ignore_errors=True)
            dist.barrier()
            raise self._failure_error(failure, tag_dir, need, self.save_retries + 1)
        if self.rank == 0:
            self._prune()
            rate = staged.bytes_written / max(staged.write_seconds, 1e-9) / 2**20
            print(
                f"[ckpt] {tag_dir.name} complete: written in the background in "
                f"{staged.write_seconds:.1f}s (rank 0: {_mb(staged.bytes_written)} MB, "
                f"{rate:.0f} MB/s)",
                flush=True,
            )

    def _mark_complete(self, tag_dir: Path, gathered: list[dict]) -> None:
        """Rank 0, after every rank's files are written: checksums (digests from the writers,
        plus any file written directly, e.g. DeepSpeed's recovery script), then the marker,
        then ``latest``."""
        digests = {k: v for part in gathered for k, v in part.items()}
        for p in sorted(tag_dir.rglob("*")):
            name = str(p.relative_to(tag_dir))
            written = p.is_file() and atomic_write.TMP_TAG not in name
            if written and name not in digests and p.name not in (MARKER, CHECKSUMS):
                digests[name] = file_digest(p, self.fsync)
        text = json.dumps(digests, indent=1, sort_keys=True)
        atomic_write.write_text(tag_dir / CHECKSUMS, text, self.fsync)
        atomic_write.write_text(tag_dir / MARKER, f"{tag_dir.name}\n")
        atomic_write.write_text(self.root / LATEST, tag_dir.name)

    def _kept(self) -> str:
        last = complete_tags(self.root)
        return f"the last complete checkpoint ({last[-1] if last else 'none'}) is untouched"

    def _last_size(self) -> tuple[str | None, int]:
        tags = complete_tags(self.root)
        if not tags:
            return None, 0
        try:
            return tags[-1], sum(v["size"] for v in read_checksums(self.root / tags[-1]).values())
        except CheckpointError:
            return tags[-1], 0

    def _preflight(self, estimate_bytes: int) -> int:
        """Bytes a save needs (the last checkpoint's size, else the estimate); raises on every
        rank when rank 0 sees less free space than the last checkpoint took (an estimate alone
        never refuses a save)."""
        verdict: list[Any] = [None]
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            last, size = self._last_size()
            need = size or estimate_bytes
            free = shutil.disk_usage(self.root).free
            verdict[0] = (need, None)
            if size and free < size:
                verdict[0] = (
                    need,
                    f"checkpoint save failed: no space left on {self.root} (needed ~"
                    f"{_mb(need)} MB, {_mb(free)} MB free); nothing was written, the last "
                    f"complete checkpoint ({last or 'none'}) is untouched",
                )
        dist.broadcast_object_list(verdict, src=0)
        need, message = verdict[0]
        if message:
            raise CheckpointError(message)
        return need

    def _save_failed(self, tag_dir: Path, error: Exception, need: int) -> CheckpointError:
        """The error to raise for a failure outside the agreed write paths (this rank only),
        after removing the partial step directory."""
        if isinstance(error, CheckpointError):
            return error
        free = shutil.disk_usage(self.root).free if self.root.is_dir() else 0
        latest = self.root / LATEST
        done = latest.is_file() and latest.read_text().strip() == tag_dir.name
        if not done:
            shutil.rmtree(tag_dir, ignore_errors=True)
        removed = f"removed the partial {tag_dir}" if not done else f"{tag_dir} is complete"
        if _no_space(error) or (need and free < need):
            return CheckpointError(
                f"checkpoint save failed: no space left on {self.root} (needed ~{_mb(need)} MB, "
                f"{_mb(free)} MB free); {removed}; {self._kept()}"
            )
        return CheckpointError(
            f"checkpoint save of {tag_dir} failed: {type(error).__name__}: {error}; "
            f"{removed}; {self._kept()}"
        )

    def _agree(self, guard: Any, need: int) -> tuple[int, str, str, bool, int] | None:
        """The first failure of any rank — ``(rank, path, error, no space, free bytes)`` —
        identical on every rank (a collective), or None."""
        mine = None
        if guard.errors:
            path, error = guard.errors[0]
            free = shutil.disk_usage(self.root).free if self.root.is_dir() else 0
            nospace = _no_space(error) or bool(need and free < need)
            mine = (self.rank, path, f"{type(error).__name__}: {error}", nospace, free)
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, mine)
        return next((g for g in gathered if g is not None), None)

    def _attempt(
        self,
        engine,
        step: int,
        state: TrainerState,
        rng_state: dict[str, Any],
        files: dict[str, Path] | None,
        need: int,
    ) -> tuple[int, str, str, bool, int] | None:
        """One collective save; the agreed failure (partial directory removed), or None."""
        tag = tag_of(step)
        tag_dir = self.root / tag
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if tag_dir.exists():  # a stale partial save of this step, or a re-save
                shutil.rmtree(tag_dir)
        dist.barrier()
        guarded = SaveErrors()
        with route_save_writes(engine, guarded):  # DeepSpeed's writes, through the same guard
            engine.save_checkpoint(
                str(self.root), tag=tag, client_state=self._client_state(state), save_latest=False
            )
        rng_file = tag_dir / "rng" / f"rank_{self.rank:05d}.pt"
        guarded(rng_file, lambda: torch_save(rng_state, rng_file, fsync=self.fsync))
        if self.rank == 0:
            text = json.dumps(state.to_json(), indent=1, sort_keys=True)
            guarded(
                tag_dir / STATE, lambda: atomic_write.write_text(tag_dir / STATE, text, self.fsync)
            )
            for name, source in (files or {}).items():
                data = Path(source).read_bytes()
                guarded(
                    tag_dir / name,
                    lambda n=name, d=data: atomic_write.write_bytes(tag_dir / n, d, self.fsync),
                )
        failure = self._agree(guarded, need)
        if failure is None:
            faults.pause_in_save(step)
            self._write_checksums(tag_dir, guarded)
            if self.rank == 0:
                guarded(
                    tag_dir / MARKER, lambda: atomic_write.write_text(tag_dir / MARKER, f"{tag}\n")
                )
                guarded(
                    self.root / LATEST, lambda: atomic_write.write_text(self.root / LATEST, tag)
                )
            failure = self._agree(guarded, need)
        if failure is not None:
            if self.rank == 0:
                latest = self.root / LATEST
                if not (latest.is_file() and latest.read_text().strip() == tag):
                    shutil.rmtree(tag_dir, ignore_errors=True)
            dist.barrier()
            return failure
        if self.rank == 0:
            self._prune()
        dist.barrier()
        return None

    @staticmethod
    def _client_state(state: TrainerState) -> dict[str, Any]:
        """What DeepSpeed keeps beside its own state: ours, and the TP merge rules of
        DeepSpeed's universal conversion (when there are rules: else same-layout resumes
        only)."""
        client_state: dict[str, Any] = {"trainer": state.to_json()}
        with contextlib.suppress(CheckpointError):
            client_state[reshard.INFO_KEY] = reshard.universal_info(
                state.tp_layout, reshard.tied_across_stages(state)
            )
        return client_state

    def _write_checksums(self, tag_dir: Path, guarded) -> None:
        names = [None]
        if self.rank == 0:
            names[0] = sorted(
                str(p.relative_to(tag_dir))
                for p in tag_dir.rglob("*")
                if p.is_file() and p.name not in (MARKER, CHECKSUMS)
            )
        dist.broadcast_object_list(names, src=0)
        mine: dict[str, Any] = {}

        def digest() -> None:
            for n in names[0][self.rank :: self.world]:
                mine[n] = file_digest(tag_dir / n, self.fsync)

        guarded(tag_dir, digest)
        gathered: list[dict] = [{} for _ in range(self.world)]
        dist.all_gather_object(gathered, mine)
        if self.rank == 0:
            merged = {k: v for part in gathered for k, v in part.items()}
            text = json.dumps(merged, indent=1, sort_keys=True)
            guarded(
                tag_dir / CHECKSUMS,
                lambda: atomic_write.write_text(tag_dir / CHECKSUMS, text, self.fsync),
            )

    def _prune(self) -> None:
        tags = complete_tags(self.root)
        keep = set(tags[-self.keep_last :])
        newest = step_of(tags[-1]) if tags else -1
        for name in tag_names(self.root):  # exact tags only: a user's step_….bak stays
            p = self.root / name
            if name in keep:
                continue
            if (p / MARKER).is_file() or step_of(name) < newest:
                shutil.rmtree(p, ignore_errors=True)
        universal = self.root / "universal"
        if universal.is_dir():  # conversions of pruned tags, or older than the newest save
            for p in universal.iterdir():
                stale = is_tag(p.name) and (
                    step_of(p.name) < newest or not (self.root / p.name).is_dir()
                )
                if stale:
                    shutil.rmtree(p, ignore_errors=True)

    # ---------------------------------------------------------------- load
    def latest(self) -> str | None:
        """The tag every rank will resume from (decided on rank 0), or None."""
        found: list[Any] = [None]
        if self.rank == 0:
            try:
                found[0] = ("tag", latest_complete(self.root))
            except CheckpointError as e:  # every rank must hear about it
                found[0] = ("error", str(e))
        dist.broadcast_object_list(found, src=0)
        kind, value = found[0]
        if kind == "error":
            raise CheckpointError(value)
        return value

    def resume(
        self,
        engine,
        model_config: dict[str, Any],
        here: Topology,
        tokenizer: tuple[TokenizerInfo, str] | None = None,
    ) -> Loaded | None:
        """Restore the latest complete checkpoint into ``engine`` for a run with
        ``model_config`` at layout ``here`` (and ``tokenizer``: this run's, and where it comes
        from): as it is, through a universal conversion (``checkpoint.reshard``), or refused
        (``CheckpointError``: another model shape or tokenizer, an unsupported layout change);
        None when there is none."""
        tag = self.latest()
        if tag is None:
            return None
        state = read_state(self.root / tag)
        # decided before DeepSpeed reads any shard
        if plan_resume(state, model_config, here, self.cfg.reshard, tokenizer):
            return self.load_resharded(engine, tag, state)
        loaded = self.load(engine, tag, state)
        if state.topology != here:  # e.g. ZeRO-0 at another DP: other ranks' RNG states
            loaded.rng = None
        return loaded

    def load(self, engine, tag: str, state: TrainerState | None = None) -> Loaded:
        """Verify (every rank checks a share of the files), then restore engine + RNG."""
        tag_dir = self.root / tag
        state = state or read_state(tag_dir)
        if self.verify:
            self._verify(tag_dir)
        with safe_loads(self.trust_pickles):  # DeepSpeed's loads: weights_only, allow-listed
            path, _client = engine.load_checkpoint(
                str(self.root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False
            )
            if path is None:
                raise CheckpointError(f"DeepSpeed could not load checkpoint {tag_dir}")
            rng_file = tag_dir / "rng" / f"rank_{self.rank:05d}.pt"
            rng = torch.load(rng_file, weights_only=True) if rng_file.is_file() else None
        return Loaded(tag=tag, state=state, rng=rng)

    def load_resharded(self, engine, tag: str, state: TrainerState | None = None) -> Loaded:
        """Resume ``tag`` at this run's (different) layout: rank 0 converts it to a DeepSpeed
        universal checkpoint (or reuses an up-to-date conversion), every rank loads its part.

        RNG states are not restored (``rng=None``): the saved ones belong to other ranks' roles.
        """
        tag_dir = self.root / tag
        state = state or read_state(tag_dir)
        if self.verify:
            self._verify(tag_dir)
        # the conversion may outlast the collective timeout: wait for it on a patient group
        patient = dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=24))
        error: list[str | None] = [None]
        if self.rank == 0:
            try:
                reshard.convert(tag_dir, verify=False, trust_pickles=self.trust_pickles)
            except CheckpointError as e:
                error[0] = str(e)
            except Exception as e:  # noqa: BLE001 - every rank must hear about it
                error[0] = f"universal conversion of {tag_dir} failed: {type(e).__name__}: {e}"
        dist.broadcast_object_list(error, src=0, group=patient)
        dist.destroy_process_group(patient)
        if error[0] is not None:
            raise CheckpointError(error[0])
        with universal_loading(engine), safe_loads(self.trust_pickles):
            path, _client = engine.load_checkpoint(
                str(reshard.universal_root(self.root)),
                tag=tag,
                load_optimizer_states=True,
                load_lr_scheduler_states=False,
            )
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load the universal checkpoint of {tag_dir}")
        if engine.zero_optimization_stage() == 3:
            fix_zero3_universal_load(
                engine.optimizer.optimizer, reshard.universal_root(self.root) / tag
            )
        return Loaded(tag=tag, state=state, rng=None)

    def _verify(self, tag_dir: Path) -> None:
        names = sorted(read_checksums(tag_dir))
        mine = verify_files(tag_dir, names[self.rank :: self.world])
        gathered: list[list[str]] = [[] for _ in range(self.world)]
        dist.all_gather_object(gathered, mine)
        problems = [p for part in gathered for p in part]
        if problems:
            raise CheckpointError(
                f"checkpoint {tag_dir} failed verification, nothing was loaded:\n  "
                + "\n  ".join(problems)
            )


def _host_memory_available() -> int:
    import psutil

    return faults.host_memory(psutil.virtual_memory().available)


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f}"


def _no_space(error: BaseException | None) -> bool:
    """Whether ``error`` (or what caused it) is ENOSPC/EDQUOT."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        error = error.__cause__ or error.__context__
    return False
