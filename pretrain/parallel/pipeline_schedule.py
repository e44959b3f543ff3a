"""One optimizer step's forward and backward at pipeline size > 1: megatron-core's 1F1B schedule
over this rank's stage, with the DeepSpeed engine as the data-parallel reducer and optimizer.

Every stage reads the same micro-batches (the first uses the tokens, the last the labels and
the loss mask); losses exist on the last stage and are handed to every rank here.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from pretrain.parallel import deepspeed_compat
from pretrain.parallel.context import token_share


def tied_weight(module: torch.nn.Module) -> torch.nn.Parameter | None:
    """This rank's copy of the tied embedding when the other copy is on another stage."""
    if ps.get_pipeline_model_parallel_world_size() == 1:
        return None
    if not getattr(module, "share_embeddings_and_output_weights", False):
        return None
    if module.pre_process or module.post_process:
        return module.shared_embedding_or_output_weight()
    return None


def tied_copy(module: torch.nn.Module) -> torch.nn.Parameter | None:
    """The last stage's copy of a tied embedding (None unless this rank holds one at P > 1)."""
    return None if module.pre_process else tied_weight(module)


def _masked_mean(loss_mask: torch.Tensor, per_token: torch.Tensor):
    # this context rank's share: megatron's schedule multiplies it by C (pipeline.context)
    loss = token_share((per_token.float() * loss_mask).sum(), loss_mask.sum())
    # the schedule divides the returned loss by the number of micro-batches in place: report a copy
    return loss, {"loss": loss.detach().clone()}


def _masked_sum(loss_mask: torch.Tensor, per_token: torch.Tensor):
    total = (per_token.double() * loss_mask).sum()
    return total, {"sum": total.detach().clone(), "count": loss_mask.sum().double()}


class PipelineStep:
    """Runs the schedule for one stage; ``runner`` is what the forward calls (the DeepSpeed
    engine, or the bare module at ZeRO-0, where DeepSpeed refuses torch-style backward)."""

    def __init__(self, engine: Any, runner: Any, seq_length: int, micro_batch_size: int) -> None:
        self.engine, self.runner = engine, runner
        self.module = engine.module
        self.seq_length, self.micro_batch_size = seq_length, micro_batch_size
        self.transport = getattr(self.module, "first_values_transport", None)
        self.last = ps.is_pipeline_last_stage()

    @classmethod
    def for_run(cls, engine: Any, cfg: Any) -> PipelineStep:
        """The step of a run with config ``cfg`` (a ``TrainConfig``): the forward runs through
        the engine, or the bare module at ZeRO-0."""
        runner = engine.module if cfg.parallel.zero_stage == 0 else engine
        # the whole sequence: megatron's schedule divides it by the context (and, with sequence
        # parallelism, tensor) parallel size for the tensors that cross stages
        return cls(engine, runner, cfg.model.seq_length, cfg.training.micro_batch_size)

    def _run(self, batches: list, loss_fn, forward_only: bool) -> list[dict]:
        def forward_step(data_iterator, model):
            b = next(data_iterator)
            out = self.runner(b.tokens, b.position_ids, None, labels=b.labels)
            return out, lambda per_token: loss_fn(b.loss_mask, per_token)

        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(batches),
            model=[self.module],
            num_microbatches=len(batches),
            seq_length=self.seq_length,
            micro_batch_size=self.micro_batch_size,
            forward_only=forward_only,
            adjust_tensor_shapes_fn=self.transport.adjust_shapes if self.transport else None,
        )

    def forward_backward(self, batches: Iterable, poison: bool = False) -> torch.Tensor | None:
        """Forward and backward of every micro-batch; the last stage returns their mean losses
        (one per micro-batch), the others None. Gradients are left in the parameters (or in
        DeepSpeed's buffers). ``poison`` makes this rank's losses NaN (fault injection)."""

        def loss_fn(loss_mask, per_token):
            loss, report = _masked_mean(loss_mask, per_token)
            if poison:
                loss = loss * float("nan")
                report = {"loss": loss.detach().clone()}
            return loss, report

        out = self._run(list(batches), loss_fn, forward_only=False)
        if not self.last:
            return None
        return torch.stack([d["loss"] for d in out])

    @torch.no_grad()
    def forward_sums(self, batches: Iterable) -> torch.Tensor:
        """``[Σ loss·mask, Σ mask]`` (float64) over ``batches``, on the last stage (zeros
        elsewhere)."""
        out = self._run(list(batches), _masked_sum, forward_only=True)
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        for d in out if self.last else []:
            sums[0] += d["sum"].to(sums.device)
            sums[1] += d["count"].to(sums.device)
        return sums

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def sum_tied_gradients(self, zero_stage: int) -> None:
        """Add the two stages' gradients of a tied embedding (ZeRO-0/1; ZeRO-2 does it at its
        boundary), so both copies take the same step."""
        weight = tied_weight(self.module)
        if weight is None or zero_stage == 2:
            return
        grad = deepspeed_compat.tied_gradient(self.engine, weight)
        if grad is None:
            grad = torch.zeros_like(weight)
            weight.grad = grad
        dist.all_reduce(grad, group=ps.get_embedding_group())


def sum_from_last_stage(value: torch.Tensor) -> torch.Tensor:
    """The sum over data parallel of the last stage's ``value``, on every rank (the last stage's
    TP ranks hold equal values; what other ranks pass is ignored)."""
    mine = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
    value = value.double().clone() if mine else torch.zeros_like(value, dtype=torch.float64)
    dist.all_reduce(value)
    return value
