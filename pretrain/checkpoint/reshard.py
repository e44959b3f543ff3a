"""Resume at another data-/tensor-parallel size through DeepSpeed universal checkpoints.

A twicing-lm checkpoint stores each rank's megatron-core TP shard and ZeRO partition. DeepSpeed's
``ds_to_universal`` turns those into one full (TP=1, unpartitioned) tensor per parameter and
optimizer state (``zero/<name>/{fp32,exp_avg,exp_avg_sq,step}.pt``), which any TP × DP layout
loads with ``"checkpoint": {"load_universal": true}``. It needs three things from us:

* ``universal_checkpoint_info`` in the client state: how each megatron-core parameter was split
  (:func:`universal_info`, derived from the ``tp_layout`` saved in every checkpoint) —
  replicated parameters (norms, row-parallel biases) are averaged, row-parallel weights
  (``linear_proj``, ``linear_fc2``) are concatenated on dim 1, column-parallel ones on dim 0
  (the fused QKV of megatron-core is grouped per query group, so a plain concatenation is the
  TP=1 layout, GQA included), and SwiGLU's ``linear_fc1`` (``partition_stride=2``, each rank
  holding ``[gate_r; up_r]``) as two sub-parameters;
* no ``_extra_state: None`` entries in the saved modules (the converter calls ``.float()`` on
  every module entry), so conversion reads a staging copy of the model-state files with them
  stripped and the info above injected — the original checkpoint is never modified;
* the padded vocabulary is the same at every TP size here, so no vocabulary re-padding is needed.

The converted checkpoint lives in ``<checkpoint root>/universal/<tag>/`` with its own
``COMPLETE`` marker and the digest of the source's ``checksums.json`` (a stale conversion is
redone, a matching one reused); the checkpoint manager prunes it with its source tag.

Supported: ZeRO-1/2 ↔ ZeRO-1/2 at any TP × DP; ZeRO-3 → ZeRO-3 at TP=1 (any DP, any saved TP);
ZeRO-0 → ZeRO-0 at the same TP (any DP: the model-state files do not depend on DP, so nothing is
converted). Everything else is refused by ``pretrain.checkpoint.resume`` with the supported path
named.

Offline conversion (e.g. with several worker processes for a large model)::

    python -m pretrain.universal RUN_DIR [--tag step_00001000] [--workers 8]
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import xxhash

from data_prep.base import atomic_write
from data_prep.base.errors import CheckpointError
from pretrain.checkpoint.layout import (
    CHECKSUMS,
    MARKER,
    STATE,
    read_state,
    verify_files,
)
from pretrain.checkpoint.state import TrainerState
from pretrain.parallel.deepspeed_compat import (
    ds_to_universal_args,
    safe_load,
    safe_loads,
    scan,
)

UNIVERSAL_DIR = "universal"
SOURCE = "SOURCE.json"

# DeepSpeed's keys (deepspeed.checkpoint.constants), spelled out so that saving a checkpoint does
# not import the converter
INFO_KEY = "universal_checkpoint_info"
VERSION_KEY = "universal_checkpoint_version"
AVERAGE = "parameter_to_average_patterns"
ROW_PARALLEL = "parameter_with_row_parallelism_patterns"
TWO_SUB_PARAMS = "parameter_with_2_sub_params_cat_dim_0"
PIPELINE_REPLICATED = "pipeline_replicated_parameter_patterns"
#: the last pipeline stage's copy of a tied embedding, and the weight it copies
TIED_COPY, TIED_WEIGHT = "output_layer.weight", "embedding.word_embeddings.weight"
#: pre-0.4 metadata: we declare no sub-parameter widths (our only sub-parameter split is SwiGLU's
#: even 2-way split, expressed with ``parameter_with_2_sub_params_cat_dim_0``)
UC_VERSION = 0.3

_LAYER_INDEX = re.compile(r"\\\.layers\\\.\d+\\\.")


def _pattern(name: str) -> str:
    """An anchored regex for ``name`` with the layer index generalised."""
    return _LAYER_INDEX.sub(lambda _m: r"\.layers\.\d+\.", re.escape(name)) + "$"


def _category(name: str, split: dict[str, Any]) -> str | None:
    dim, stride = split["dim"], split.get("stride", 1)
    if dim is None:
        return AVERAGE
    if dim == 0 and stride == 1:
        return None  # DeepSpeed's default: concatenate on dim 0
    if dim == 1 and stride == 1:
        return ROW_PARALLEL
    if dim == 0 and stride == 2:
        return TWO_SUB_PARAMS
    raise CheckpointError(
        f"no universal-checkpoint merge rule for {name} (TP split on dim {dim} with stride "
        f"{stride}); resume it at the saved layout"
    )


def tied_across_stages(state: TrainerState) -> bool:
    """Whether ``state``'s checkpoint holds a tied embedding on two pipeline stages."""
    return state.topology.pipeline > 1 and bool(state.model_config.get("tied_embeddings", True))


def universal_info(tp_layout: dict[str, dict[str, Any]], tied_copy: bool = False) -> dict[str, Any]:
    """DeepSpeed's ``universal_checkpoint_info`` for a model with this TP layout.

    ``tp_layout`` is ``{parameter name: {"dim": d|None, "stride": s}}`` (``trainer_state.json``).
    Layer indices are generalised (``decoder\\.layers\\.\\d+\\.…``), so the lists stay short.
    ``tied_copy``: the last pipeline stage's copy of the tied embedding is skipped (the first
    stage's is the weight).
    """
    info: dict[str, Any] = {
        VERSION_KEY: UC_VERSION,
        AVERAGE: [],
        ROW_PARALLEL: [],
        TWO_SUB_PARAMS: [],
        PIPELINE_REPLICATED: [re.escape(TIED_COPY) + "$"] if tied_copy else [],
    }
    seen: dict[str, str | None] = {}
    for name, split in sorted(tp_layout.items()):
        pattern, category = _pattern(name), _category(name, split)
        if pattern in seen and seen[pattern] != category:
            raise CheckpointError(
                f"parameters matching {pattern} are split differently across layers; "
                "no universal-checkpoint pattern covers them"
            )
        if pattern not in seen:
            seen[pattern] = category
            if category is not None:
                info[category].append(pattern)
    return info


# ---------------------------------------------------------------------------- conversion
def universal_root(checkpoint_root: Path) -> Path:
    return Path(checkpoint_root) / UNIVERSAL_DIR


def source_digest(tag_dir: Path) -> str:
    return xxhash.xxh3_128((Path(tag_dir) / CHECKSUMS).read_bytes()).hexdigest()


def converted(tag_dir: Path) -> Path | None:
    """The complete, up-to-date universal copy of ``tag_dir``, if there is one."""
    out = universal_root(tag_dir.parent) / tag_dir.name
    try:
        source = json.loads((out / SOURCE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if (out / MARKER).is_file() and source.get("checksums_xxh3_128") == source_digest(tag_dir):
        return out
    return None


def _strip_extra_state(module: dict[str, Any]) -> dict[str, Any]:
    return (
        {k: v for k, v in module.items() if not (k.endswith("_extra_state") and v is None)}
        if isinstance(module, dict)
        else module
    )


def _stage(tag_dir: Path, staging: Path, info: dict[str, Any], trust_pickles: bool) -> None:
    """A copy of the DeepSpeed files the converter reads: optimizer shards linked (after a
    pickle-safety scan unless ``trust_pickles``), model-state files rewritten without
    ``_extra_state: None`` and with ``info`` injected."""
    staging.mkdir(parents=True)
    optim = sorted(tag_dir.glob("*_optim_states.pt"))
    if not trust_pickles:
        scan(optim)
    for f in optim:
        os.symlink(f.resolve(), staging / f.name)
    for f in sorted(tag_dir.glob("*_model_states.pt")):
        sd = (
            torch.load(f, map_location="cpu", weights_only=False) if trust_pickles else safe_load(f)
        )
        if "module" in sd:
            sd["module"] = _strip_extra_state(sd["module"])
        sd[INFO_KEY] = info
        torch.save(sd, staging / f.name)


def convert(
    tag_dir: str | Path,
    workers: int = 1,
    quiet: bool = True,
    verify: bool = True,
    trust_pickles: bool = False,
) -> Path:
    """Convert one complete checkpoint into ``<root>/universal/<tag>/`` (verified first unless
    the caller already did; every file read with ``weights_only=True`` and an allow-list unless
    ``trust_pickles``).

    Reuses an up-to-date earlier conversion. Writes into a scratch directory and renames it
    into place, so an interrupted conversion leaves nothing that would be loaded. ``workers``
    > 1 lets DeepSpeed fork extraction/merge processes (use it only outside a training job).
    """
    tag_dir = Path(tag_dir)
    state = read_state(tag_dir)
    done = converted(tag_dir)
    if done is not None:
        return done
    problems = verify_files(tag_dir) if verify else []
    if problems:
        raise CheckpointError(
            f"checkpoint {tag_dir} failed verification, not converted:\n  " + "\n  ".join(problems)
        )
    if state.topology.zero_stage == 0:
        raise CheckpointError(
            f"{tag_dir} is a ZeRO-0 checkpoint: DeepSpeed's universal conversion needs ZeRO "
            "partitions (resume it with zero_stage=0 at the same TP; any DP size works as is)"
        )
    info = universal_info(state.tp_layout, tied_across_stages(state))
    root = universal_root(tag_dir.parent)
    out = root / tag_dir.name
    for stale in root.glob(f".tmp-{tag_dir.name}-*"):  # left by a killed conversion
        shutil.rmtree(stale, ignore_errors=True)
    scratch = root / f".tmp-{tag_dir.name}-{os.getpid()}"
    try:
        _stage(tag_dir, scratch / "input", info, trust_pickles)
        with safe_loads(trust_pickles):
            _run_converter(scratch / "input", scratch / tag_dir.name, workers, quiet)
        result = scratch / tag_dir.name
        if state.model_config.get("tied_embeddings", True):
            _link_tied_copy(result / "zero")
        shutil.copy2(tag_dir / STATE, result / STATE)
        saved = tag_dir / state.tokenizer.file  # tokenizer.model, or a tokenizer/ directory
        if saved.is_dir():
            shutil.copytree(saved, result / state.tokenizer.file)
        elif saved.is_file():
            shutil.copy2(saved, result / state.tokenizer.file)
        atomic_write.write_text(
            result / SOURCE,
            json.dumps(
                {
                    "source": str(tag_dir),
                    "checksums_xxh3_128": source_digest(tag_dir),
                    "topology": asdict(state.topology),
                    INFO_KEY: info,
                },
                indent=1,
            ),
        )
        atomic_write.write_text(result / MARKER, f"{tag_dir.name}\n")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(result, out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return out


def _link_tied_copy(zero_dir: Path) -> None:
    """Any pipeline stage that holds the tied embedding's copy loads it from the weight's state
    (what the converter left for the copy is not a whole state: dropped)."""
    copy = zero_dir / TIED_COPY
    if copy.is_symlink() or copy.is_file():
        copy.unlink()
    elif copy.is_dir():
        shutil.rmtree(copy)
    if (zero_dir / TIED_WEIGHT).is_dir():
        os.symlink(TIED_WEIGHT, copy, target_is_directory=True)


def _run_converter(input_dir: Path, output_dir: Path, workers: int, quiet: bool) -> None:
    from deepspeed.checkpoint import ds_to_universal

    args = ds_to_universal_args(input_dir, output_dir, workers)
    log = io.StringIO()
    previous = os.environ.get("TQDM_DISABLE")
    if quiet:
        os.environ["TQDM_DISABLE"] = "1"
    try:
        with contextlib.redirect_stdout(log) if quiet else contextlib.nullcontext():
            ds_to_universal.main(args)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(
            f"DeepSpeed's universal conversion of {input_dir.parent} failed: "
            f"{type(e).__name__}: {e}\n{log.getvalue()[-2000:]}"
        ) from e
    finally:
        if quiet:
            if previous is None:
                os.environ.pop("TQDM_DISABLE", None)
            else:
                os.environ["TQDM_DISABLE"] = previous
