"""Build the model and wrap it in a DeepSpeed engine (TP-aware through the mpu adapter)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from model import build_gpt
from model.tp_layout import layout_of
from pretrain.config import TrainConfig
from pretrain.parallel.ds_config import deepspeed_config
from pretrain.parallel.mpu import MegatronMPU
from pretrain.parallel.optimizer import zero0_optimizer
from pretrain.parallel.sequence_parallel import allreduce_sequence_parallel_grads


@dataclass
class Built:
    engine: Any
    num_params: int
    layout: dict[str, dict]


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices; none on biases and norm weights."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_engine(cfg: TrainConfig, world_size: int) -> Built:
    """megatron-core GPT (this rank's TP shard) inside a DeepSpeed engine."""
    import deepspeed

    model = build_gpt(cfg.model, sequence_parallel=cfg.parallel.sequence_parallel)
    tp = cfg.parallel.tensor
    num_params = sum(
        p.numel() * (tp if getattr(p, "tensor_model_parallel", False) else 1)
        for p in model.parameters()
    )
    layout = {k: v.to_json() for k, v in layout_of(model).items()}
    if cfg.parallel.sequence_parallel and tp > 1:
        allreduce_sequence_parallel_grads(model)
    groups = param_groups(model, cfg.optimizer.weight_decay)
    client_optimizer = (
        zero0_optimizer(groups, cfg.optimizer) if cfg.parallel.zero_stage == 0 else None
    )
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=groups,
        optimizer=client_optimizer,
        config=deepspeed_config(cfg, world_size),
        mpu=MegatronMPU(),
    )
    if cfg.parallel.zero_stage == 0 and engine.dp_world_size == 1:
        # nothing to average over, but DeepSpeed would still flatten, "all-reduce" and copy back
        # every gradient each step (~8% of a CPU step)
        engine.enable_backward_allreduce = False
    return Built(engine=engine, num_params=num_params, layout=layout)


def lm_loss(engine, tokens, position_ids, labels, loss_mask) -> torch.Tensor:
    """Mean next-token cross-entropy over the unmasked positions of a micro-batch."""
    per_token = engine(tokens, position_ids, None, labels=labels)
    return (per_token.float() * loss_mask).sum() / loss_mask.sum()
