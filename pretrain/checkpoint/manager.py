"""Save and restore a DeepSpeed engine plus our state, collectively on every rank (the layout
is ``pretrain.checkpoint.layout``)."""

from __future__ import annotations

import contextlib
import datetime
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from data_prep import atomic
from pretrain import faults
from pretrain.checkpoint import reshard
from pretrain.checkpoint.layout import (
    _TAG_PREFIX,
    CHECKSUMS,
    LATEST,
    MARKER,
    STATE,
    complete_tags,
    file_digest,
    latest_complete,
    read_state,
    step_of,
    tag_of,
    torch_save,
    verify_files,
)
from pretrain.checkpoint.state import TrainerState
from pretrain.errors import CheckpointError


@dataclass
class Loaded:
    tag: str
    state: TrainerState
    rng: dict[str, Any] | None


class CheckpointManager:
    """Saves and restores a DeepSpeed engine plus our state, collectively on every rank."""

    def __init__(self, root: Path, keep_last: int, verify: bool = True, fsync: bool = False):
        self.root = Path(root)
        self.keep_last = keep_last
        self.verify = verify
        self.fsync = fsync
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
    ) -> Path:
        """Collective save; ``files`` (name → source) are copied into the checkpoint by rank 0."""
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
            client_state[reshard.INFO_KEY] = reshard.universal_info(state.tp_layout)
        engine.save_checkpoint(
            str(self.root), tag=tag, client_state=client_state, save_latest=False
        )
        torch_save(rng_state, tag_dir / "rng" / f"rank_{self.rank:05d}.pt", fsync=self.fsync)
        if self.rank == 0:
            atomic.write_text(
                tag_dir / STATE, json.dumps(state.to_json(), indent=1, sort_keys=True), self.fsync
            )
            for name, source in (files or {}).items():
                atomic.write_bytes(tag_dir / name, Path(source).read_bytes(), self.fsync)
        dist.barrier()
        faults.pause_in_save(step)
        self._write_checksums(tag_dir)
        if self.rank == 0:
            atomic.write_text(tag_dir / MARKER, f"{tag}\n")
            atomic.write_text(self.root / LATEST, tag)
            self._prune()
        dist.barrier()
        return tag_dir

    def _write_checksums(self, tag_dir: Path) -> None:
        names = [None]
        if self.rank == 0:
            names[0] = sorted(
                str(p.relative_to(tag_dir))
                for p in tag_dir.rglob("*")
                if p.is_file() and p.name not in (MARKER, CHECKSUMS)
            )
        dist.broadcast_object_list(names, src=0)
        mine = {n: file_digest(tag_dir / n, self.fsync) for n in names[0][self.rank :: self.world]}
        gathered: list[dict] = [{} for _ in range(self.world)]
        dist.all_gather_object(gathered, mine)
        if self.rank == 0:
            merged = {k: v for part in gathered for k, v in part.items()}
            atomic.write_text(
                tag_dir / CHECKSUMS, json.dumps(merged, indent=1, sort_keys=True), self.fsync
            )

    def _prune(self) -> None:
        tags = complete_tags(self.root)
        keep = set(tags[-self.keep_last :])
        newest = step_of(tags[-1]) if tags else -1
        for p in self.root.iterdir():
            if not p.is_dir() or not p.name.startswith(_TAG_PREFIX) or p.name in keep:
                continue
            if (p / MARKER).is_file() or step_of(p.name) < newest:
                shutil.rmtree(p, ignore_errors=True)
        universal = self.root / "universal"
        if universal.is_dir():  # conversions of pruned tags, or older than the newest save
            for p in universal.iterdir():
                if p.name.startswith(_TAG_PREFIX) and (
                    step_of(p.name) < newest or not (self.root / p.name).is_dir()
                ):
                    shutil.rmtree(p, ignore_errors=True)

    # ---------------------------------------------------------------- load
    def latest(self) -> str | None:
        """The tag every rank will resume from (decided on rank 0), or None."""
        tag = [latest_complete(self.root) if self.rank == 0 else None]
        dist.broadcast_object_list(tag, src=0)
        return tag[0]

    def load(self, engine, tag: str) -> Loaded:
        """Verify (every rank checks a share of the files), then restore engine + RNG."""
        tag_dir = self.root / tag
        state = read_state(tag_dir)
        if self.verify:
            self._verify(tag_dir)
        path, _client = engine.load_checkpoint(
            str(self.root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {tag_dir}")
        rng_file = tag_dir / "rng" / f"rank_{self.rank:05d}.pt"
        rng = torch.load(rng_file, weights_only=True) if rng_file.is_file() else None
        return Loaded(tag=tag, state=state, rng=rng)

    def load_resharded(self, engine, tag: str) -> Loaded:
        """Resume ``tag`` at this run's (different) layout: rank 0 converts it to a DeepSpeed
        universal checkpoint (or reuses an up-to-date conversion), every rank loads its part.

        RNG states are not restored (``rng=None``): the saved ones belong to other ranks' roles.
        """
        tag_dir = self.root / tag
        state = read_state(tag_dir)
        if self.verify:
            self._verify(tag_dir)
        # the conversion may outlast the collective timeout: wait for it on a patient group
        patient = dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=24))
        error: list[str | None] = [None]
        if self.rank == 0:
            try:
                reshard.convert(tag_dir, verify=False)
            except CheckpointError as e:
                error[0] = str(e)
            except Exception as e:  # noqa: BLE001 - every rank must hear about it
                error[0] = f"universal conversion of {tag_dir} failed: {type(e).__name__}: {e}"
        dist.broadcast_object_list(error, src=0, group=patient)
        dist.destroy_process_group(patient)
        if error[0] is not None:
            raise CheckpointError(error[0])
        previous = engine._config.load_universal_checkpoint
        engine._config.load_universal_checkpoint = True
        try:
            path, _client = engine.load_checkpoint(
                str(reshard.universal_root(self.root)),
                tag=tag,
                load_optimizer_states=True,
                load_lr_scheduler_states=False,
            )
        finally:
            engine._config.load_universal_checkpoint = previous
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load the universal checkpoint of {tag_dir}")
        if engine.zero_optimization_stage() == 3:
            reshard.fix_zero3_universal_load(
                engine.optimizer.optimizer, reshard.universal_root(self.root) / tag
            )
        return Loaded(tag=tag, state=state, rng=None)

    def _verify(self, tag_dir: Path) -> None:
        checksums = tag_dir / CHECKSUMS
        if not checksums.is_file():
            raise CheckpointError(f"checkpoint {tag_dir} has no {CHECKSUMS}")
        names = sorted(json.loads(checksums.read_text()))
        mine = verify_files(tag_dir, names[self.rank :: self.world])
        gathered: list[list[str]] = [[] for _ in range(self.world)]
        dist.all_gather_object(gathered, mine)
        problems = [p for part in gathered for p in part]
        if problems:
            raise CheckpointError(
                f"checkpoint {tag_dir} failed verification, nothing was loaded:\n  "
                + "\n  ".join(problems)
            )
