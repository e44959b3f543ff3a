"""Build the model (this rank's TP shard of its pipeline stage) and wrap it in a DeepSpeed
engine (TP/PP-aware through the mpu adapter)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from model import build_gpt
from model.tp_layout import layout_of
from pretrain.parallel import deepspeed_compat, distributed
from pretrain.parallel.context import context_size, token_share
from pretrain.parallel.ds_config import deepspeed_config
from pretrain.parallel.mpu import MegatronMPU
from pretrain.parallel.optimizer import zero0_optimizer
from pretrain.parallel.pipeline_schedule import tied_copy, tied_weight
from pretrain.parallel.sequence_parallel import allreduce_sequence_parallel_grads
from pretrain.train_config import TrainConfig


@dataclass
class Built:
    engine: Any
    num_params: int
    layout: dict[str, dict]


def param_groups(
    model: torch.nn.Module, weight_decay: float, alone: torch.nn.Parameter | None = None
) -> list[dict[str, Any]]:
    """Weight decay on matrices; none on biases and norm weights. ``alone`` (the tied embedding
    under ZeRO-2 at P > 1) gets a third group of its own, so the first and last stage partition
    it alike."""
    params = [p for p in model.parameters() if p.requires_grad and p is not alone]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    if alone is not None:
        groups.append({"params": [alone], "weight_decay": weight_decay})
    return groups


def count_parameters(model: torch.nn.Module, tp: int) -> int:
    """Parameters of the whole model: every TP shard and pipeline stage, the tied copy once."""
    duplicate = tied_copy(model)
    n = sum(
        p.numel() * (tp if getattr(p, "tensor_model_parallel", False) else 1)
        for p in model.parameters()
        if p is not duplicate
    )
    if ps.get_pipeline_model_parallel_world_size() == 1:
        return n
    total = torch.tensor([n], dtype=torch.int64, device=distributed.device())
    dist.all_reduce(total, group=ps.get_pipeline_model_parallel_group())
    return int(total.item())


def stage_layout(model: torch.nn.Module) -> dict[str, dict]:
    """The TP layout of every parameter of the whole model (all stages, global names)."""
    mine = {k: v.to_json() for k, v in layout_of(model).items()}
    if ps.get_pipeline_model_parallel_world_size() == 1:
        return mine
    stages: list[dict | None] = [None] * ps.get_pipeline_model_parallel_world_size()
    dist.all_gather_object(stages, mine, group=ps.get_pipeline_model_parallel_group())
    return {k: v for stage in stages for k, v in stage.items()}


def build_engine(
    cfg: TrainConfig,
    world_size: int,
    load_weights: Callable[[torch.nn.Module], None] | None = None,
) -> Built:
    """megatron-core GPT (this rank's TP shard) inside a DeepSpeed engine; ``load_weights``
    (``checkpoint.init_from``) fills the fresh model before DeepSpeed copies its weights."""
    import deepspeed

    model = build_gpt(
        cfg.model,
        sequence_parallel=cfg.parallel.sequence_parallel,
        context_mode=cfg.parallel.context_mode,
    )
    if load_weights is not None:
        load_weights(model)
    tp, pp, zero = cfg.parallel.tensor, cfg.parallel.pipeline, cfg.parallel.zero_stage
    num_params = count_parameters(model, tp)
    layout = stage_layout(model)
    if cfg.parallel.sequence_parallel and tp > 1:
        allreduce_sequence_parallel_grads(model)
    duplicate = tied_copy(model)
    if duplicate is not None:
        deepspeed_compat.mark_pipeline_replicated(duplicate)
    tied = tied_weight(model) if zero == 2 else None
    groups = param_groups(model, cfg.optimizer.weight_decay, alone=tied)
    client_optimizer = zero0_optimizer(groups, cfg.optimizer) if zero == 0 else None
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=groups,
        optimizer=client_optimizer,
        config=deepspeed_config(cfg, world_size),
        mpu=MegatronMPU(),
    )
    if zero == 0 and (engine.dp_world_size == 1 or pp > 1):
        # DP 1: nothing to average over, but DeepSpeed would still flatten, "all-reduce" and copy
        # back every gradient each step (~8% of a CPU step); P > 1: the pipeline step reduces
        deepspeed_compat.disable_backward_allreduce(engine)
    if pp > 1 and zero > 0:
        deepspeed_compat.reset_backward_state_per_backward(engine)
    if tied is not None:
        deepspeed_compat.sum_tied_group_at_boundary(
            engine, len(groups) - 1, ps.get_embedding_group()
        )
        deepspeed_compat.load_groups_the_save_lacked(engine)
    return Built(engine=engine, num_params=num_params, layout=layout)


def lm_loss(engine, tokens, position_ids, labels, loss_mask) -> torch.Tensor:
    """Mean next-token cross-entropy over the unmasked positions of a micro-batch (with context
    parallelism: ``C`` × this rank's share, see ``pretrain.parallel.context``)."""
    per_token = engine(tokens, position_ids, None, labels=labels)
    share = token_share((per_token.float() * loss_mask).sum(), loss_mask.sum())
    return share * context_size()
