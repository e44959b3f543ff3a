"""Derive DeepSpeed's JSON config from a ``TrainConfig`` (never written by hand)."""

from __future__ import annotations

from typing import Any

import torch

from pretrain.train_config import TrainConfig


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """DeepSpeed settings for ``world_size`` ranks (DP = world / TP)."""
    t, p, o = cfg.training, cfg.parallel, cfg.optimizer
    opt_params: dict[str, Any] = {
        "lr": o.lr,
        "betas": list(o.betas),
        "eps": o.eps,
        "weight_decay": o.weight_decay,
    }
    if not p.offload_optimizer:
        # torch's fused AdamW (same math as DeepSpeed's FusedAdam in AdamW mode): on CUDA it needs
        # no JIT build of DeepSpeed's op with nvcc at start-up, on the CPU it is ~4x faster than
        # torch's per-parameter loop. Offload keeps DeepSpeed's CPU Adam.
        opt_params["torch_adam"] = True
        opt_params["fused"] = True
    zero: dict[str, Any] = {"stage": p.zero_stage}
    if p.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if p.zero_stage == 3:
        # keep whole-model gathering out of the save path; we reshard via universal checkpoints
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    accumulation = cfg.grad_accumulation(world_size)
    if p.pipeline > 1:
        # megatron's schedule runs the micro-batches and divides the loss by their number: to
        # DeepSpeed every optimizer step is one "micro-batch" whose backwards only accumulate
        accumulation = 1
    ds = {
        # DeepSpeed's data parallel is DP × CP (context ranks share samples): it checks this size
        "train_batch_size": t.micro_batch_size
        * cfg.data_parallel_size(world_size)
        * p.context
        * accumulation,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": o.grad_clip,
        "optimizer": {"type": "AdamW", "params": opt_params},
        "zero_optimization": zero,
        "bf16": {"enabled": p.precision == "bf16"},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "checkpoint": {"tag_validation": "FAIL"},
    }
    if p.pipeline > 1:
        ds["managed_gradient_accumulation"] = False
    if p.zero_stage == 0:
        # ZeRO-0 gets our SkippableAdamW, and clipping happens in pretrain.optimizer (one norm pass)
        del ds["optimizer"]
        ds["gradient_clipping"] = 0.0
    return ds
