"""Read a training checkpoint without DeepSpeed: config, tokenizer, and weights at any TP size.

``open_checkpoint`` accepts a run directory, a checkpoint root (with ``latest``), one
``step_XXXXXXXX`` directory or a consolidated weights file (``pretrain.consolidate``), refuses
incomplete or damaged checkpoints, and checks a user-given tokenizer against the one saved with
the run. ``full_state_dict`` merges the pipeline stages (their parameter names are global: a union)
and the TP shards into the TP=1 weights (ZeRO 0–2 from DeepSpeed's module states, ZeRO-3 from its
fp32 partitions).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from data_prep.base.errors import CheckpointError
from data_prep.base.strict_config import from_dict
from data_prep.tokenizer_kinds import Tokenizer, load_tokenizer
from model import ModelConfig
from model.tp_layout import Split, merge, shard
from pretrain.checkpoint.layout import (
    MARKER,
    check_tag,
    is_tag,
    latest_complete,
    read_checksums,
    read_state,
    tokenizer_names,
    verify_files,
)
from pretrain.checkpoint.state import TrainerState
from pretrain.parallel.deepspeed_compat import safe_load, safe_loads


@dataclass
class Checkpoint:
    tag_dir: Path  # the step directory, or the consolidated file
    state: TrainerState
    model: ModelConfig
    tokenizer: Tokenizer
    #: TP=1 weights of a consolidated file (None: read from the shards on demand)
    weights: dict[str, torch.Tensor] | None = None
    _scratch: Any = None  # keeps a consolidated file's extracted tokenizer alive

    @property
    def step(self) -> int:
        return self.state.step

    @property
    def tensor_parallel(self) -> int:
        return 1 if self.weights is not None else self.state.topology.tensor

    @property
    def pipeline_parallel(self) -> int:
        return 1 if self.weights is not None else self.state.topology.pipeline

    @property
    def zero_stage(self) -> int:
        return self.state.topology.zero_stage

    @property
    def layout(self) -> dict[str, Split]:
        return {k: Split.from_json(v) for k, v in self.state.tp_layout.items()}


def resolve(path: str | Path, tag: str | None = None) -> Path:
    """The ``step_*`` directory that ``path`` (run dir, checkpoint root or tag dir) designates."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if (path / "trainer_state.json").exists() or is_tag(path.name):
        tag_dir = path
    else:
        root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        chosen = check_tag(tag, "--tag") if tag is not None else latest_complete(root)
        if chosen is None:
            raise CheckpointError(f"no complete checkpoint under {root}")
        tag_dir = root / chosen
    if not tag_dir.is_dir():
        raise CheckpointError(f"checkpoint {tag_dir} does not exist")
    if not (tag_dir / MARKER).is_file():
        raise CheckpointError(
            f"checkpoint {tag_dir} is incomplete (no {MARKER} marker): not loaded"
        )
    return tag_dir


def open_checkpoint(
    path: str | Path, tag: str | None = None, tokenizer: str | Path | None = None
) -> Checkpoint:
    """Config and tokenizer of a complete checkpoint (weights are read later, on demand)."""
    if Path(path).is_file():
        return _open_consolidated(Path(path), tokenizer)
    tag_dir = resolve(path, tag)
    state = read_state(tag_dir)
    names = tokenizer_names(read_checksums(tag_dir), state.tokenizer.file)
    problems = verify_files(tag_dir, names) if names else [f"{tag_dir}: no tokenizer saved"]
    if problems:
        raise CheckpointError("; ".join(problems))
    saved = tag_dir / state.tokenizer.file
    _check_tokenizer(tokenizer, saved, state.tokenizer.sha256)
    model = from_dict(ModelConfig, state.model_config, "model")
    return Checkpoint(tag_dir, state, model, _load_saved_tokenizer(saved))


def _load_saved_tokenizer(saved: Path) -> Tokenizer:
    from data_prep.base.errors import DataPrepError

    try:
        return load_tokenizer(saved)
    except DataPrepError as e:
        raise CheckpointError(f"the checkpoint's tokenizer is unreadable: {e}") from None


def _check_tokenizer(given: str | Path | None, saved: Path, expected_sha256: str) -> None:
    """A user-given tokenizer must be the checkpoint's (its content hash)."""
    if given is None:
        return
    from data_prep.base.errors import DataPrepError

    try:
        digest = load_tokenizer(given).sha256
    except DataPrepError as e:
        raise CheckpointError(f"--tokenizer: {e}") from None
    if digest != expected_sha256:
        raise CheckpointError(
            f"tokenizer {given} (sha256 {digest[:12]}…) does not match the checkpoint's "
            f"{saved} (sha256 {expected_sha256[:12]}…): token ids would mean different things"
        )


def _open_consolidated(path: Path, tokenizer: str | Path | None) -> Checkpoint:
    """A consolidated file (``pretrain.consolidate``): TP=1 weights, config and tokenizer."""
    from pretrain.checkpoint.consolidated import load, tokenizer_payload

    payload = load(path)
    state = TrainerState.from_json(payload["trainer_state"], f"{path} [trainer_state]")
    scratch = tempfile.TemporaryDirectory(prefix="twicing-tokenizer-")
    for name, data in tokenizer_payload(payload).items():
        target = Path(scratch.name) / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data.numpy().tobytes())
    tok = _load_saved_tokenizer(Path(scratch.name) / state.tokenizer.file)
    if tok.sha256 != state.tokenizer.sha256:
        raise CheckpointError(f"{path}: the embedded tokenizer does not match its recorded sha256")
    _check_tokenizer(tokenizer, path, state.tokenizer.sha256)
    model = from_dict(ModelConfig, state.model_config, "model")
    weights = {k: v.float() for k, v in payload["state_dict"].items()}
    return Checkpoint(path, state, model, tok, weights, scratch)


def _module_file(ck: Checkpoint, mp_rank: int) -> Path:
    return ck.tag_dir / f"mp_rank_{mp_rank:02d}_model_states.pt"


def _module(path: Path) -> dict[str, Any]:
    """The ``module`` weights of a DeepSpeed model-states file (``weights_only``, allow-listed:
    a file carrying anything else is a ``CheckpointError`` naming it, and nothing in it runs)."""
    sd = safe_load(path)
    if not isinstance(sd, dict) or not isinstance(sd.get("module"), dict):
        raise CheckpointError(f"{path}: no 'module' weights in this DeepSpeed model-states file")
    return sd["module"]


def _clean(sd: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Drop megatron's ``_extra_state`` placeholders; keep real tensors."""
    return {k: v for k, v in sd.items() if not k.endswith("_extra_state")}


#: the last pipeline stage's copy of a tied embedding (the first stage's is the weight)
TIED_COPY = "output_layer.weight"


def tp_shards(ck: Checkpoint) -> list[dict[str, torch.Tensor]]:
    """The saved module weights of each TP rank, all pipeline stages merged (verified against
    the checksums first). File ``mp_rank_{stage·TP + tp}`` holds stage ``stage`` of TP rank
    ``tp``; the tied embedding's second copy is left out."""
    tp, pp = ck.tensor_parallel, ck.pipeline_parallel
    if ck.zero_stage < 3:
        files = [[_module_file(ck, stage * tp + r) for stage in range(pp)] for r in range(tp)]
        problems = verify_files(ck.tag_dir, [f.name for stages in files for f in stages])
        if problems:
            raise CheckpointError("; ".join(problems))
        shards = []
        for stages in files:
            merged: dict[str, torch.Tensor] = {}
            for f in stages:
                merged.update(_clean(_module(f)))
            if pp > 1 and ck.model.tied_embeddings:
                merged.pop(TIED_COPY, None)
            shards.append(merged)
        return shards
    problems = verify_files(ck.tag_dir)
    if problems:
        raise CheckpointError("; ".join(problems))
    return [_zero3_rank(ck, r) for r in range(tp)]


def _zero3_rank(ck: Checkpoint, mp_rank: int) -> dict[str, torch.Tensor]:
    """fp32 weights of one TP rank from ZeRO-3 partitions, via DeepSpeed's own reconstruction.

    DeepSpeed's ``zero_to_fp32`` reads every ``*_states.pt`` of a directory as one TP rank, so
    each rank's files are linked into a scratch directory of their own first.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    suffix = f"_mp_rank_{mp_rank:02d}_"
    with tempfile.TemporaryDirectory() as scratch:
        tag = Path(scratch) / "rank"
        tag.mkdir()
        for f in ck.tag_dir.glob(f"zero_pp_rank_*{suffix}*_states.pt"):
            os.symlink(f, tag / f.name.replace(suffix, "_mp_rank_00_"))
        with safe_loads():  # DeepSpeed's zero_to_fp32 loads with weights_only=False
            sd = get_fp32_state_dict_from_zero_checkpoint(scratch, tag="rank")
    return _clean({k: v.float() for k, v in sd.items()})


def full_state_dict(ck: Checkpoint) -> dict[str, torch.Tensor]:
    """The TP=1 weights, merged from the TP shards with the layout saved in the checkpoint."""
    if ck.weights is not None:
        return dict(ck.weights)
    shards = tp_shards(ck)
    layout = ck.layout
    missing = set(shards[0]) - set(layout)
    if missing:
        raise CheckpointError(f"{ck.tag_dir}: no TP layout for {sorted(missing)[:3]}")
    return {name: merge([s[name] for s in shards], layout[name]) for name in shards[0]}


def saved_shard(ck: Checkpoint, mp_rank: int) -> dict[str, torch.Tensor]:
    """The module weights of saved model-parallel rank ``mp_rank`` (``stage·TP + tp``) of a
    ZeRO 0–2 checkpoint, verified against the checksums first."""
    path = _module_file(ck, mp_rank)
    problems = verify_files(ck.tag_dir, [path.name])
    if problems:
        raise CheckpointError("; ".join(problems))
    return _clean(_module(path))


def state_dict_for_rank(ck: Checkpoint, rank: int, tp: int) -> dict[str, torch.Tensor]:
    """Weights for TP rank ``rank`` of ``tp`` (direct when ``tp`` is the saved TP size)."""
    direct = ck.weights is None and ck.zero_stage < 3 and ck.pipeline_parallel == 1
    if direct and tp == ck.tensor_parallel:
        return saved_shard(ck, rank)
    layout = ck.layout
    return {k: shard(v, layout[k], rank, tp).clone() for k, v in full_state_dict(ck).items()}
