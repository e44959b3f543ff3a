"""Training/validation data: megatron-core GPTDatasets over data_prep outputs, batched by
consumed samples so the sample order never depends on the world size."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

from data_prep.base.errors import ConfigError
from pretrain.train_config import TrainConfig


@dataclass
class Batch:
    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor

    def to(self, device: torch.device) -> Batch:
        return Batch(
            *(
                t.to(device, non_blocking=True)
                for t in (self.tokens, self.labels, self.loss_mask, self.position_ids)
            )
        )


def build_datasets(
    tokenizer: Any, blend_kwargs: dict[str, Any], cfg: TrainConfig
) -> tuple[GPTDataset, GPTDataset | None]:
    """Train and validation datasets of run ``cfg``: as many samples as its steps (and
    evaluations) consume, in ``data.seed``'s order, cached in ``data.cache_dir`` (default: beside
    the checkpoints). Built on every rank."""
    g = cfg.training.global_batch_size
    num_train = cfg.training.train_steps * g
    num_valid = (cfg.training.eval_steps if cfg.training.eval_interval else 0) * g
    cache_dir = cfg.data.cache_dir or (cfg.checkpoint_dir.parent / "data_cache")
    config = GPTDatasetConfig(
        random_seed=cfg.data.seed,
        sequence_length=cfg.model.seq_length,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        path_to_cache=str(cache_dir),
        mmap_bin_files=True,
        **blend_kwargs,
    )
    train, valid, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [num_train, num_valid, 0], lambda: True, config
    ).build()
    if train is None:
        raise ConfigError("data.manifest: the training split is empty")
    if num_valid and valid is None:
        raise ConfigError(
            "data.manifest: validation is enabled but the manifest has no valid split"
        )
    return train, valid


def micro_batches(
    dataset, first_sample: int, *, micro: int, dp: int, dp_rank: int, accumulation: int
) -> Iterator[Batch]:
    """This rank's micro-batches of the global batch starting at sample ``first_sample``.

    The global batch is samples ``[first, first + micro·dp·accumulation)`` whatever the split:
    micro-step ``j`` covers ``micro·dp`` consecutive samples and DP rank ``r`` takes its
    ``micro``-sized slice, so any (micro, DP, accumulation) with the same global batch trains on
    the same samples per step.
    """
    for j in range(accumulation):
        start = first_sample + (j * dp + dp_rank) * micro
        yield collate([dataset[i] for i in range(start, start + micro)])


def collate(samples: list[dict[str, torch.Tensor]]) -> Batch:
    return Batch(
        tokens=torch.stack([s["tokens"] for s in samples]),
        labels=torch.stack([s["labels"] for s in samples]),
        loss_mask=torch.stack([s["loss_mask"] for s in samples]),
        position_ids=torch.stack([s["position_ids"] for s in samples]),
    )


def load_data(cfg) -> tuple[Any, dict[str, Any]]:
    """Tokenizer and megatron blend arguments from the run's data_prep manifest, checked up front
    (missing files, empty splits, vocabulary too large for the model) so a bad manifest fails
    before any process-group work."""
    from data_prep.base.errors import DataPrepError
    from data_prep.manifest import load_manifest

    try:
        manifest = load_manifest(cfg.data.manifest)
        manifest.check_files()  # a truncated .bin would crash mid-run
        manifest.check_nonempty()
        tokenizer = manifest.tokenizer()
        blend = manifest.gpt_dataset_kwargs()
    except DataPrepError as e:
        raise ConfigError(f"config key 'data.manifest': {e}") from None
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"config key 'model.vocab_size': {cfg.model.vocab_size} is smaller than the "
            f"tokenizer's vocabulary ({tokenizer.vocab_size}, {manifest.tokenizer_model})"
        )
    return tokenizer, blend
