"""The training configuration: YAML presets validated into dataclasses.

``load_config(path, overrides)`` reads a preset, applies ``dotted.key=value`` overrides (values
parsed as YAML), and validates every field; errors name the key and the bad value. The DeepSpeed
JSON is derived from this (``pretrain.ds_config``), never written by hand.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from data_prep.base.errors import ConfigError
from data_prep.base.strict_config import check, from_dict, to_dict
from model import ModelConfig


@dataclass
class ParallelConfig:
    """Tensor × context × data × pipeline parallel; DP = world / (tensor × context × pipeline).

    Rank order is megatron's tp-cp-dp-pp: TP ranks are adjacent, then the context-parallel ranks
    that share a sample's sequence, pipeline stages are the slowest dimension (place them across
    nodes). ``context_mode``: how attention crosses the context-parallel ranks
    (``model.attention.context_parallel``): ``allgather`` (any head count) or ``ulysses``
    (all-to-all; needs this rank's heads and key/value groups divisible by ``context``)."""

    tensor: int = 1
    pipeline: int = 1
    context: int = 1
    context_mode: Literal["allgather", "ulysses"] = "allgather"
    zero_stage: int = 1
    offload_optimizer: bool = False
    sequence_parallel: bool = False
    precision: Literal["fp32", "bf16"] = "fp32"

    def __post_init__(self) -> None:
        check(self.tensor >= 1, "parallel.tensor", f"must be >= 1, got {self.tensor}")
        check(self.pipeline >= 1, "parallel.pipeline", f"must be >= 1, got {self.pipeline}")
        check(self.context >= 1, "parallel.context", f"must be >= 1, got {self.context}")
        if self.context > 1:
            check(
                self.zero_stage != 3,
                "parallel.zero_stage",
                "ZeRO-3 with context parallelism is not supported (untested; use zero_stage 0, "
                "1 or 2)",
            )
            check(
                not self.offload_optimizer,
                "parallel.offload_optimizer",
                "optimizer offload with context parallelism is not supported (untested)",
            )
        if self.pipeline > 1:
            check(
                self.zero_stage != 3,
                "parallel.zero_stage",
                "ZeRO-3 with pipeline parallelism is refused: DeepSpeed's ZeRO-3 runs a "
                "collective in every forward, which deadlocks against the other stages' p2p "
                "(use zero_stage 0, 1 or 2)",
            )
            check(
                not self.offload_optimizer,
                "parallel.offload_optimizer",
                "optimizer offload with pipeline parallelism is not supported (untested)",
            )
        check(
            self.zero_stage in (0, 1, 2, 3), "parallel.zero_stage", f"{self.zero_stage} not in 0-3"
        )
        check(
            not (self.zero_stage == 0 and self.precision == "bf16"),
            "parallel.precision",
            "bf16 with zero_stage 0 is refused: DeepSpeed 0.19 takes a spurious optimizer step at "
            "init and under-reports the TP grad norm in that mode; use zero_stage >= 1",
        )
        check(
            not (self.offload_optimizer and self.zero_stage == 0),
            "parallel.offload_optimizer",
            "optimizer offload needs zero_stage >= 1",
        )


@dataclass
class DataConfig:
    """Where the token data is: a data_prep manifest (splits, blend weights, tokenizer)."""

    manifest: str = ""
    seed: int = 1234
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        check(bool(self.manifest), "data.manifest", "a data_prep manifest path is required")


@dataclass
class OptimizerConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    warmup_steps: int = 100
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    decay_steps: int | None = None

    def __post_init__(self) -> None:
        check(self.lr > 0, "optimizer.lr", f"must be > 0, got {self.lr}")
        check(
            0 <= self.min_lr <= self.lr,
            "optimizer.min_lr",
            f"must be in [0, lr], got {self.min_lr}",
        )
        check(len(self.betas) == 2, "optimizer.betas", f"needs two values, got {self.betas}")
        for i, beta in enumerate(self.betas):
            check(0.0 <= beta < 1.0, f"optimizer.betas[{i}]", f"must be in [0, 1), got {beta}")
        check(self.eps > 0, "optimizer.eps", f"must be > 0, got {self.eps}")
        check(
            self.weight_decay >= 0,
            "optimizer.weight_decay",
            f"must be >= 0, got {self.weight_decay}",
        )
        for key in ("lr", "min_lr", "eps", "weight_decay", "grad_clip"):
            value = getattr(self, key)
            check(math.isfinite(value), f"optimizer.{key}", f"must be finite, got {value}")
        check(self.warmup_steps >= 0, "optimizer.warmup_steps", "must be >= 0")
        check(self.grad_clip >= 0, "optimizer.grad_clip", "must be >= 0 (0 disables clipping)")


@dataclass
class TrainingConfig:
    train_steps: int = 100
    micro_batch_size: int = 4
    global_batch_size: int = 8
    seed: int = 1234
    log_interval: int = 10
    eval_interval: int = 50
    eval_steps: int = 4
    nonfinite: Literal["skip", "halt"] = "halt"
    exit_at_step: int | None = None
    timeout_minutes: float = 10.0
    #: under ``nonfinite: skip``, halt (exit 3) after more consecutive skipped steps (0: never)
    max_consecutive_skips: int = 10

    def __post_init__(self) -> None:
        for key in ("train_steps", "micro_batch_size", "global_batch_size", "log_interval"):
            check(
                getattr(self, key) > 0, f"training.{key}", f"must be > 0, got {getattr(self, key)}"
            )
        check(self.eval_interval >= 0, "training.eval_interval", "must be >= 0 (0 disables)")
        check(self.eval_steps >= 0, "training.eval_steps", f"must be >= 0, got {self.eval_steps}")
        check(
            self.eval_steps >= 1 or self.eval_interval == 0,
            "training.eval_steps",
            f"must be >= 1 when eval_interval > 0 (got 0 with eval_interval {self.eval_interval})",
        )
        check(
            self.max_consecutive_skips >= 0,
            "training.max_consecutive_skips",
            f"must be >= 0 (0: no limit), got {self.max_consecutive_skips}",
        )
        check(self.timeout_minutes > 0, "training.timeout_minutes", "must be > 0")


@dataclass
class CheckpointConfig:
    """``reshard``: resume a checkpoint saved with another TP × DP layout (or ZeRO stage) through
    a DeepSpeed universal checkpoint (``pretrain.universal``); without it such a resume is
    refused."""

    dir: str | None = None
    interval: int = 100
    keep_last: int = 3
    verify: bool = True
    fsync: bool = False
    reshard: bool = False
    #: load DeepSpeed's files with full pickle (code in a tampered file would run); default:
    #: ``weights_only`` with an allow-list (``pretrain.parallel.deepspeed_compat``)
    trust_pickles: bool = False
    #: retries of a save whose write failed on some rank for another reason than a full disk
    save_retries: int = 1
    #: write checkpoints in the background (``pretrain.checkpoint.async_save``): training blocks
    #: only while DeepSpeed's save collects the state and, before the next optimizer update,
    #: until the tensors are copied to host memory
    async_save: bool = False
    #: a fresh run starts from this checkpoint's weights (a run dir, step dir or consolidated
    #: file: an import from ``pretrain.import_hf`` or any trained run) with its own optimizer,
    #: schedule and data order (``pretrain.checkpoint.init_from``); ignored once the run has
    #: checkpoints of its own (it resumes them)
    init_from: str | None = None

    def __post_init__(self) -> None:
        check(self.interval >= 0, "checkpoint.interval", "must be >= 0 (0: only on signal/exit)")
        check(self.keep_last >= 1, "checkpoint.keep_last", f"must be >= 1, got {self.keep_last}")
        check(
            self.save_retries >= 0,
            "checkpoint.save_retries",
            f"must be >= 0, got {self.save_retries}",
        )


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    peak_tflops: float | None = None


@dataclass
class TrainConfig:
    """Everything a run needs; ``run_dir`` holds its checkpoints, TensorBoard logs and config."""

    run_dir: str
    model: ModelConfig
    data: DataConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        self.model.check_tensor_parallel(self.parallel.tensor)
        self.model.check_pipeline_parallel(self.parallel.pipeline)
        self.model.check_context_parallel(
            self.parallel.context, self.parallel.context_mode, self.parallel.tensor
        )
        p = self.parallel
        check(
            not (p.pipeline > 2 and p.zero_stage == 2 and self.model.tied_embeddings),
            "parallel.zero_stage",
            f"ZeRO-2 with tied embeddings needs pipeline size <= 2, got {p.pipeline}: DeepSpeed "
            "all-reduces the gradient norm per parameter group, and the middle stages hold no "
            "copy of the tied embedding (untie it: model.tied_embeddings=false, or use ZeRO-1)",
        )
        check(
            self.training.global_batch_size % self.training.micro_batch_size == 0,
            "training.global_batch_size",
            f"{self.training.global_batch_size} is not a multiple of micro_batch_size "
            f"{self.training.micro_batch_size}",
        )
        self._check_init_from()

    def _check_init_from(self) -> None:
        """``checkpoint.init_from`` must lie outside this run's directory (its own checkpoints
        resume; they are no starting point)."""
        source = self.checkpoint.init_from
        if source is None:
            return
        check(bool(source), "checkpoint.init_from", "must name a checkpoint (or be null)")
        run, start = Path(self.run_dir).resolve(), Path(source).resolve()
        check(
            start != run and run not in start.parents,
            "checkpoint.init_from",
            f"{source} is this run's own directory (run_dir={self.run_dir}): a run resumes its "
            "own checkpoints by itself; init_from starts a new run_dir from another one",
        )

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir or Path(self.run_dir) / "checkpoints")

    @property
    def tensorboard_dir(self) -> Path:
        return Path(self.run_dir) / "tensorboard"

    def data_parallel_size(self, world_size: int) -> int:
        """DP size for ``world_size`` ranks; raises ``ConfigError`` when the shapes do not fit."""
        tp, pp, cp = self.parallel.tensor, self.parallel.pipeline, self.parallel.context
        key = "parallel.pipeline" if pp > 1 else "parallel.context" if cp > 1 else "parallel.tensor"
        check(
            world_size % (tp * cp * pp) == 0,
            key,
            f"world size {world_size} is not divisible by tensor-parallel size {tp}"
            + (f" × context-parallel size {cp}" if cp > 1 else "")
            + (f" × pipeline-parallel size {pp}" if pp > 1 else "")
            + (f" = {tp * cp * pp}" if cp * pp > 1 else ""),
        )
        dp = world_size // (tp * cp * pp)
        per_step = self.training.micro_batch_size * dp
        check(
            self.training.global_batch_size % per_step == 0,
            "training.global_batch_size",
            f"{self.training.global_batch_size} is not divisible by micro_batch_size × DP = "
            f"{self.training.micro_batch_size} × {dp} = {per_step}",
        )
        micro_batches = self.training.global_batch_size // per_step
        check(
            micro_batches >= pp,
            "training.global_batch_size",
            f"{micro_batches} micro-batches per step (global_batch_size "
            f"{self.training.global_batch_size} / (micro_batch_size "
            f"{self.training.micro_batch_size} × DP {dp})) are fewer than the {pp} pipeline "
            "stages: some stages would never work at once; raise global_batch_size",
        )
        return dp

    def grad_accumulation(self, world_size: int) -> int:
        dp = self.data_parallel_size(world_size)
        return self.training.global_batch_size // (self.training.micro_batch_size * dp)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML would keep the
    last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"duplicate key {key!r} (first at line {seen[key].line + 1})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str) -> Any:
    """``yaml.safe_load`` with duplicate keys refused (``yaml.YAMLError``)."""
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one ``dotted.key=value`` override (value parsed as YAML) to ``data`` in place."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {assignment!r} is not of the form dotted.key=value")
    try:
        value = parse_yaml(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        detail = " ".join(str(e).split())
        raise ConfigError(
            f"override {assignment!r}: the value {raw!r} is not valid YAML ({detail})"
        ) from None
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {assignment!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def load_config(
    path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()
) -> TrainConfig:
    """Read a YAML preset (or start empty), apply overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = parse_yaml(path.read_text())
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {path} is not UTF-8 text: {e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        data = loaded or {}
    for assignment in overrides:
        apply_override(data, assignment)
    where = f" (in {path})" if path else ""
    try:
        return from_dict(TrainConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{e}{where}") from None
