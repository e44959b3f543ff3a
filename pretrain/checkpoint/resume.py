"""The one place that decides how a checkpoint resumes here: as is, resharded, or refused."""

from __future__ import annotations

from typing import Any

from data_prep.base.errors import CheckpointError
from pretrain.checkpoint.state import TokenizerInfo, Topology, TrainerState


def plan_resume(
    state: TrainerState,
    model_config: dict[str, Any],
    here: Topology,
    reshard: bool,
    tokenizer: tuple[TokenizerInfo, str] | None = None,
) -> bool:
    """Raise unless ``state`` can resume a run with ``model_config`` at ``here`` (and, when
    given, ``tokenizer``: this run's tokenizer and where it comes from); True when its shards
    must be converted (``checkpoint.reshard=true``) first."""
    if state.origin == "import":
        raise CheckpointError(
            "this run directory holds an import (pretrain.import_hf: weights only, no optimizer "
            "state, schedule or data position), not a run to resume: start a new run from it "
            "with run_dir=<a new directory> checkpoint.init_from=<this run directory>"
        )
    if tokenizer is not None:
        check_same_tokenizer(state, *tokenizer)
    saved_model = with_model_defaults(state.model_config)
    diff = sorted(
        k for k in set(saved_model) | set(model_config) if saved_model.get(k) != model_config.get(k)
    )
    if diff:
        details = ", ".join(f"{k}: {saved_model.get(k)!r} -> {model_config.get(k)!r}" for k in diff)
        raise CheckpointError(f"checkpoint model config differs from this run's ({details})")
    saved = state.topology
    if saved == here:
        return False
    if not reshard:
        raise CheckpointError(
            f"checkpoint was saved at {saved.describe()}, this run is {here.describe()}; to "
            "resume with another layout, run again with checkpoint.reshard=true (converts it "
            "through a DeepSpeed universal checkpoint)"
        )
    return check_supported(saved, here)


def with_model_defaults(saved: dict[str, Any]) -> dict[str, Any]:
    """``saved`` (a checkpoint's model config) plus the defaults of ``ModelConfig`` keys added
    after it was written (``qkv_bias``, ``rope_scaling``, …: their defaults are what older code
    computed)."""
    from dataclasses import MISSING, fields

    from model import ModelConfig

    defaults = {f.name: f.default for f in fields(ModelConfig) if f.default is not MISSING}
    return {**defaults, **saved}


def check_supported(saved: Topology, here: Topology) -> bool:
    """Whether resuming ``saved`` at ``here`` needs a conversion; raises ``CheckpointError``
    naming the supported path when the combination cannot work."""
    a, b = saved.zero_stage, here.zero_stage
    where = f"a {saved.describe()} checkpoint cannot be resumed at {here.describe()}"
    if a == 0 or b == 0:
        same_model_shards = (saved.tensor, saved.pipeline) == (here.tensor, here.pipeline)
        if a == b == 0 and same_model_shards:
            return False  # ZeRO-0 model states are per TP (× PP) rank: any DP loads them as is
        if a == 0:
            raise CheckpointError(
                f"{where}: ZeRO-0 checkpoints keep a plain optimizer state that DeepSpeed's "
                "universal conversion does not read. Supported: resume with zero_stage=0 and "
                f"parallel.tensor={saved.tensor}"
                + (f" and parallel.pipeline={saved.pipeline}" if saved.pipeline > 1 else "")
                + " at any data-parallel size"
            )
        raise CheckpointError(
            f"{where}: a universal checkpoint cannot be loaded into ZeRO-0 (DeepSpeed restores it "
            "through the ZeRO optimizer). Supported: resume with zero_stage 1 or 2 at any TP × DP"
        )
    if b == 3 and here.tensor > 1:
        raise CheckpointError(
            f"{where}: DeepSpeed 0.19 loads universal checkpoints into ZeRO-3 only at tensor "
            "parallel 1 (megatron-core parameters carry no AutoTP restore metadata). Supported: "
            "resume with parallel.tensor=1 and zero_stage=3 at any data-parallel size"
            + (", or with zero_stage 1 or 2 at any TP × DP" if a in (1, 2) else "")
        )
    if (a == 3) != (b == 3):
        raise CheckpointError(
            f"{where}: DeepSpeed's universal format differs between ZeRO-3 and ZeRO-1/2 "
            "(partition layout and optimizer state). Supported: "
            + (
                "resume with zero_stage=3 and parallel.tensor=1 at any data-parallel size"
                if a == 3
                else "resume with zero_stage 1 or 2 at any TP × DP × PP"
            )
        )
    return True


def check_same_tokenizer(state: TrainerState, mine: TokenizerInfo, source: str) -> None:
    """Refuse (``CheckpointError``) to resume a checkpoint trained on another tokenizer: the
    same ids would mean other text."""
    saved = state.tokenizer
    if saved.sha256 == mine.sha256:
        return
    raise CheckpointError(
        f"checkpoint was trained with tokenizer sha256 {saved.sha256[:16]}… (vocabulary "
        f"{saved.vocab_size}, saved as {saved.file} in the step directory), but this run's "
        f"tokenizer is {source} with sha256 {mine.sha256[:16]}… (vocabulary {mine.vocab_size}): "
        "the same token ids would mean other text. Resume with the data.manifest the run was "
        "trained with (or one made with its tokenizer)"
    )
