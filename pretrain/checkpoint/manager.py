"""Save and restore a DeepSpeed engine plus our state, collectively on every rank (the layout
is ``pretrain.checkpoint.layout``)."""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from data_prep.base import atomic_write
from data_prep.base.errors import CheckpointError
from pretrain import faults
from pretrain.checkpoint import reshard
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
from pretrain.checkpoint.state import TokenizerInfo, Topology, TrainerState
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
        need = self._preflight(estimate_bytes)
        tag_dir = self.root / tag_of(step)
        for attempt in range(self.save_retries + 1):
            try:
                failure = self._attempt(engine, step, state, rng_state, files, need)
            except Exception as e:  # noqa: BLE001 - outside the agreed paths: this rank only
                raise self._save_failed(tag_dir, e, need) from None
            if failure is None:
                return tag_dir
            rank, path, error, nospace, free = failure
            kept = self._kept()
            if nospace:
                raise CheckpointError(
                    f"checkpoint save failed: no space left on {self.root} (needed ~"
                    f"{_mb(need)} MB, {_mb(free)} MB free; rank {rank} writing {path}); "
                    f"removed the partial {tag_dir}; {kept}"
                )
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
            raise CheckpointError(
                f"checkpoint save of {tag_dir} failed on rank {rank}: {error} (writing {path}); "
                f"{attempt + 1} attempt(s) (checkpoint.save_retries={self.save_retries}); "
                f"removed the partial directory; {kept}"
            )
        raise AssertionError("unreachable")

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

    def _agree(self, guard: SaveErrors, need: int) -> tuple[int, str, str, bool, int] | None:
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
        client_state: dict[str, Any] = {"trainer": state.to_json()}
        # TP merge rules for DeepSpeed's universal conversion
        with contextlib.suppress(CheckpointError):  # no rule: only same-layout resumes
            client_state[reshard.INFO_KEY] = reshard.universal_info(
                state.tp_layout, reshard.tied_across_stages(state)
            )
        guarded = SaveErrors()
        with route_save_writes(engine, guarded):  # DeepSpeed's writes, through the same guard
            engine.save_checkpoint(
                str(self.root), tag=tag, client_state=client_state, save_latest=False
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


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f}"


def _no_space(error: BaseException | None) -> bool:
    """Whether ``error`` (or what caused it) is ENOSPC/EDQUOT."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        error = error.__cause__ or error.__context__
    return False
