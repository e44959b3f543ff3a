"""The training loop: DeepSpeed engine over a megatron-core GPT, resumable bit for bit."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from data_prep.base.errors import ExitCode, NonFiniteError
from pretrain import faults
from pretrain.checkpoint.init_from import weights_loader
from pretrain.checkpoint.layout import tokenizer_files
from pretrain.checkpoint.manager import CheckpointManager
from pretrain.checkpoint.state import TokenizerInfo, Topology, TrainerState
from pretrain.parallel import deepspeed_compat, distributed, rng
from pretrain.parallel.context import keep_local_tokens
from pretrain.parallel.engine import build_engine, lm_loss
from pretrain.parallel.launch_env import LaunchEnv
from pretrain.parallel.optimizer import zero0_prepare_step
from pretrain.parallel.pipeline_schedule import PipelineStep, sum_from_last_stage
from pretrain.train_config import TrainConfig
from pretrain.training.data import Batch, build_datasets, micro_batches
from pretrain.training.flops import flops_per_token, peak_tflops
from pretrain.training.lr_schedule import lr_at
from pretrain.training.metrics import Metrics, memory_gb
from pretrain.training.run_lock import RunDirBusy, RunLock
from pretrain.training.signals import StopRequest
from pretrain.training.versions import library_versions


@dataclass
class StepResult:
    loss: float
    grad_norm: float | None
    skipped: bool


class Trainer:
    """One run on this rank, built whole by the constructor: process groups, the run dir's lock,
    data, the DeepSpeed engine and the resumed state (``checkpoint.CheckpointManager.resume``);
    then :meth:`run` trains to the end (or to a stop) and :meth:`close` releases what it holds.
    Components get their config section whole."""

    def __init__(
        self,
        cfg: TrainConfig,
        env: LaunchEnv,
        tokenizer: Any,
        blend_kwargs: dict[str, Any],
        stop: StopRequest | None = None,
    ):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.stop = stop or StopRequest()
        self.stop.install()
        distributed.init(env, cfg.parallel, cfg.training.timeout_minutes)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        #: data parallel (which samples a rank reads) and data × context parallel (over which
        #: losses and evaluation sums are reduced: context ranks share samples)
        self.dp = parallel_state.get_data_parallel_world_size()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.cp = parallel_state.get_context_parallel_world_size()
        self.dp_cp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        self.accumulation = cfg.grad_accumulation(self.world)
        self.device = distributed.device()
        self.lock = self._lock_run_dir()
        rng.seed_everything(cfg.training.seed)
        self.metrics = Metrics(cfg.logging, Path(cfg.run_dir), self.rank)
        self.train_ds, self.valid_ds = build_datasets(tokenizer, blend_kwargs, cfg)
        self.checkpoints = CheckpointManager(cfg.checkpoint_dir, cfg.checkpoint)
        built = build_engine(cfg, self.world, load_weights=self._init_from())
        self.engine, self.num_params, self.layout = built.engine, built.num_params, built.layout
        self.pipe = PipelineStep.for_run(self.engine, cfg) if cfg.parallel.pipeline > 1 else None
        self.flops_per_token = flops_per_token(cfg.model)
        self.peak = peak_tflops(cfg.logging.peak_tflops)
        self.step = 0
        self.consumed_samples = 0
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.lr = lr_at(0, cfg.optimizer, cfg.training.train_steps)
        self._resume()

    def _lock_run_dir(self) -> RunLock | None:
        """Rank 0 takes the run dir's lock (every rank refuses when another job holds it), then
        writes the resolved config: nothing in a live run's directory is touched before. Returns
        the lock (rank 0) or None."""
        import yaml

        busy: list[str | None] = [None]
        lock = None
        if self.rank == 0:
            lock = RunLock(self.cfg.run_dir)
            try:
                lock.acquire()
            except RunDirBusy as e:
                busy[0] = str(e)
        dist.broadcast_object_list(busy, src=0)
        if busy[0] is not None:
            raise RunDirBusy(busy[0])
        if self.rank == 0:
            (Path(self.cfg.run_dir) / "config.yaml").write_text(
                yaml.safe_dump(self.cfg.to_dict(), sort_keys=False)
            )
        return lock

    def _init_from(self) -> Callable[[torch.nn.Module], None] | None:
        """``checkpoint.init_from``'s weight loader for a run without checkpoints of its own."""
        source = self.cfg.checkpoint.init_from
        if source is None:
            return None
        if self.checkpoints.latest() is not None:
            self.metrics.print(f"[train] {self.cfg.checkpoint_dir} has checkpoints: resuming "
                               f"them (checkpoint.init_from={source} is ignored)")  # fmt: skip
            return None
        return weights_loader(source, self.cfg.model, self._tokenizer_info(), self.metrics.print)

    def _resume(self) -> None:
        """Take over the latest complete checkpoint's state, as the checkpoint package decides
        (as it is, resharded, or refused)."""
        here = self._topology()
        mine = (self._tokenizer_info(), f"{self.tokenizer.model_path} (data.manifest)")
        loaded = self.checkpoints.resume(self.engine, self.cfg.to_dict()["model"], here, mine)
        if loaded is None:
            source = self.cfg.checkpoint.init_from
            start = f"starting from {source}'s weights" if source else "starting fresh"
            self.metrics.print(f"[train] no checkpoint in {self.cfg.checkpoint_dir}; {start}")
            return
        state = loaded.state
        self.step = state.step
        self.consumed_samples = state.consumed_samples
        self.skipped_steps = state.skipped_steps
        if loaded.rng is not None:
            rng.restore(loaded.rng)
        else:
            # the saved RNG states belong to other ranks' roles: reseed deterministically from
            # the seed and the step, alike on every rank as at the start of a run (dropout masks
            # then differ from the original run's)
            rng.seed_everything(self.cfg.training.seed + self.step)
        how = f" (resharded {state.topology.describe()} -> {here.describe()})"
        self.metrics.print(
            f"[train] resumed from {loaded.tag}: step {self.step}, {self.consumed_samples} samples"
            + (how if state.topology != here else "")
        )

    def _tokenizer_info(self) -> TokenizerInfo:
        """What a checkpoint records of this run's tokenizer."""
        t = self.tokenizer
        return TokenizerInfo(tokenizer_files(t)[0], t.sha256, t.vocab_size, t.eod)

    def _topology(self) -> Topology:
        return Topology(
            tensor=self.cfg.parallel.tensor,
            data=self.dp,
            zero_stage=self.cfg.parallel.zero_stage,
            pipeline=self.cfg.parallel.pipeline,
            context=self.cp,
        )

    # ------------------------------------------------------------------ loop
    def run(self) -> int:
        cfg = self.cfg
        pp = cfg.parallel.pipeline
        cp = f" × CP {self.cp} ({cfg.parallel.context_mode})" if self.cp > 1 else ""
        self.metrics.print(
            f"[train] {self.world} ranks (TP {cfg.parallel.tensor}{cp} × DP {self.dp}"
            + (f" × PP {pp}" if pp > 1 else "")
            + f"), ZeRO-{cfg.parallel.zero_stage}, {cfg.parallel.precision}, "
            + (
                f"{self.accumulation} micro-batches per step"
                if pp > 1
                else f"grad accumulation {self.accumulation}"
            )
            + f", {self.num_params:,} parameters"
        )
        if pp > 1 and self.accumulation < 4 * pp:
            bubble = (pp - 1) / (self.accumulation + pp - 1)
            self.metrics.print(
                f"[train] warning: {self.accumulation} micro-batches per step for {pp} pipeline "
                f"stages: the pipeline idles {100 * bubble:.0f}% of each step (fewer than 4 × "
                f"{pp}; raise training.global_batch_size or lower micro_batch_size)"
            )
        if distributed.any_rank(self.stop.requested):  # a stop that arrived during start-up
            self.metrics.print("[train] stop requested before the first step; exiting to resume")
            return ExitCode.RESUMABLE
        while self.step < cfg.training.train_steps:
            faults.hold_before_step(self.step + 1, lambda: self.stop.requested)
            t0 = time.perf_counter()
            result = self._train_step()
            elapsed = time.perf_counter() - t0
            self.step += 1
            self.consumed_samples += cfg.training.global_batch_size
            self.metrics.record(
                {
                    "step": self.step,
                    "loss": result.loss,
                    "lr": self.lr,
                    "grad_norm": result.grad_norm,
                    "skipped": result.skipped,
                    "seconds": elapsed,
                }
            )
            if self.step % cfg.training.log_interval == 0 or self.step == 1:
                self._log(result, elapsed)
            if cfg.training.eval_interval and self.step % cfg.training.eval_interval == 0:
                self.evaluate()
            stop_now = self.stop.requested or self.step == cfg.training.exit_at_step
            stop_now = distributed.any_rank(stop_now)
            periodic = cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0
            finished = self.step == cfg.training.train_steps
            self.checkpoints.poll()  # a background save that every rank finished: COMPLETE
            if periodic or stop_now or finished:
                self.save()
            if stop_now or finished:
                self.checkpoints.finish(why="before exiting")
            if stop_now and not finished:
                self.metrics.print(f"[train] stopping after step {self.step} (checkpoint written)")
                return ExitCode.RESUMABLE
        if cfg.training.eval_interval and self.step % cfg.training.eval_interval:
            self.evaluate()
        return ExitCode.OK

    def _train_step(self) -> StepResult:
        cfg, engine = self.cfg, self.engine
        lr = lr_at(self.step, cfg.optimizer, cfg.training.train_steps)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        self.lr = lr
        batches = self._local(
            micro_batches(
                self.train_ds,
                self.consumed_samples,
                micro=cfg.training.micro_batch_size,
                dp=self.dp,
                dp_rank=self.dp_rank,
                accumulation=self.accumulation,
            )
        )
        if self.pipe is not None:
            return self._account(*self._pipeline_step(batches))
        losses = []
        for i, batch in enumerate(batches):
            batch = batch.to(self.device)
            loss = lm_loss(engine, batch.tokens, batch.position_ids, batch.labels, batch.loss_mask)
            if faults.nan_at_step(self.step, self.rank):
                loss = loss * float("nan")
            engine.backward(loss)
            losses.append(loss.detach())
            if i == self.accumulation - 1:
                nonfinite = distributed.any_rank(not all(torch.isfinite(x) for x in losses))
                if nonfinite and cfg.training.nonfinite == "halt":
                    raise NonFiniteError(f"non-finite loss at step {self.step + 1}")
                grad_norm, skipped = self._optimizer_step(nonfinite)
            else:
                engine.step()  # DeepSpeed accumulates until the last micro-batch
        mean = torch.stack(losses).mean()
        dist.all_reduce(mean, group=self.dp_cp_group)
        return self._account(mean.item() / (self.dp * self.cp), grad_norm, skipped)

    @staticmethod
    def _local(batches):
        """This context-parallel rank's tokens of each micro-batch (all of them at CP 1)."""
        for b in batches:
            yield Batch(*(keep_local_tokens(t) for t in (b.tokens, b.labels, b.loss_mask,
                                                         b.position_ids)))  # fmt: skip

    def _pipeline_step(self, batches) -> tuple[float, float | None, bool]:
        """One step at pipeline size > 1: the schedule, then the tied-embedding sum, (ZeRO-0)
        DP averaging and clipping, and the optimizer; the loss is the last stage's."""
        cfg, engine, pipe = self.cfg, self.engine, self.pipe
        assert pipe is not None
        first_loss_rank = (
            parallel_state.is_pipeline_last_stage()
            and parallel_state.get_tensor_model_parallel_rank() == 0
            and self.dp_rank == 0
        )
        poison = faults.nan_at_step(self.step, 0 if first_loss_rank else -1)
        losses = pipe.forward_backward((b.to(self.device) for b in batches), poison)
        bad = losses is not None and not bool(torch.isfinite(losses).all())
        nonfinite = distributed.any_rank(bad)
        if nonfinite and cfg.training.nonfinite == "halt":
            raise NonFiniteError(f"non-finite loss at step {self.step + 1}")
        pipe.sum_tied_gradients(cfg.parallel.zero_stage)
        if cfg.parallel.zero_stage == 0 and self.dp > 1:
            deepspeed_compat.allreduce_gradients_now(engine)
        grad_norm, skipped = self._optimizer_step(nonfinite)
        mean = losses.mean() if losses is not None else torch.zeros((), device=self.device)
        # the last stage's losses are context shares: they add up over the context ranks
        loss = sum_from_last_stage(mean).item() / self.dp
        return loss, grad_norm, skipped

    def _optimizer_step(self, nonfinite: bool) -> tuple[float | None, bool]:
        """The step's optimizer update: (ZeRO-0) our norm, clipping and skip, then DeepSpeed's
        step; returns ``(grad_norm, skipped)``."""
        engine, zero = self.engine, self.cfg.parallel.zero_stage
        grad_norm = None
        self.checkpoints.before_update()  # a background save has copied what it saves
        if zero == 0:
            grad_norm, nonfinite = zero0_prepare_step(
                engine,
                parallel_state.get_tensor_model_parallel_group(),
                self.cfg.optimizer.grad_clip,
                nonfinite,
                parallel_state.get_pipeline_model_parallel_group(),
            )
        skipped_before = engine.skipped_steps
        engine.step()
        if zero > 0:
            norm = engine.get_global_grad_norm()
            grad_norm = float(norm) if norm is not None else None
        return grad_norm, nonfinite or engine.skipped_steps > skipped_before

    def _account(self, loss: float, grad_norm: float | None, skipped: bool) -> StepResult:
        """Count skipped steps; halt on too many in a row."""
        cfg = self.cfg
        if skipped and cfg.training.nonfinite == "halt":
            raise NonFiniteError(
                f"non-finite gradient at step {self.step + 1} (DeepSpeed skipped it)"
            )
        if skipped:
            self.skipped_steps += 1
            self.consecutive_skips += 1
            limit = cfg.training.max_consecutive_skips
            if limit and self.consecutive_skips > limit:
                first = self.step + 2 - self.consecutive_skips
                raise NonFiniteError(
                    f"steps {first}-{self.step + 1}: {self.consecutive_skips} consecutive steps "
                    f"had a non-finite loss or gradient and were skipped (more than "
                    f"training.max_consecutive_skips={limit}); halting: the run is not training "
                    "(lower optimizer.lr, check the data, or resume from an earlier checkpoint)"
                )
        else:
            self.consecutive_skips = 0
        return StepResult(loss=loss, grad_norm=grad_norm, skipped=skipped)

    def _log(self, r: StepResult, elapsed: float) -> None:
        cfg = self.cfg
        tokens = cfg.training.global_batch_size * cfg.model.seq_length
        tps = tokens / elapsed
        tflops = self.flops_per_token * tps / self.world / 1e12
        mfu = tflops / self.peak if self.peak else None
        mem = memory_gb()
        gn = f"{r.grad_norm:.3f}" if r.grad_norm is not None else "n/a"
        self.metrics.print(
            f"[train] step {self.step}/{cfg.training.train_steps} loss {r.loss:.4f} "
            f"lr {self.lr:.3e} grad_norm {gn} {tps:,.0f} tok/s {tflops:.3f} TFLOP/s/rank"
            + (f" MFU {100 * mfu:.1f}%" if mfu is not None else "")
            + f" mem {mem:.2f} GiB skipped {self.skipped_steps}"
        )
        self.metrics.scalars(
            self.step,
            {
                "train/loss": r.loss,
                "train/lr": self.lr,
                "train/grad_norm": r.grad_norm,
                "train/tokens_per_sec": tps,
                "train/tflops_per_rank": tflops,
                "train/mfu": mfu,
                "train/memory_gib": mem,
                "train/skipped_steps": float(self.skipped_steps),
            },
        )

    @torch.no_grad()
    def evaluate(self) -> float | None:
        if self.valid_ds is None:
            return None
        cfg = self.cfg
        self.engine.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        g = cfg.training.global_batch_size
        for k in range(cfg.training.eval_steps):
            batches = self._local(
                micro_batches(
                    self.valid_ds,
                    k * g,
                    micro=cfg.training.micro_batch_size,
                    dp=self.dp,
                    dp_rank=self.dp_rank,
                    accumulation=self.accumulation,
                )
            )
            if self.pipe is not None:  # megatron's forward-only schedule
                total += self.pipe.forward_sums(b.to(self.device) for b in batches)
                continue
            for batch in batches:
                batch = batch.to(self.device)
                per_token = self.engine(batch.tokens, batch.position_ids, None, labels=batch.labels)
                total[0] += (per_token.double() * batch.loss_mask).sum()
                total[1] += batch.loss_mask.sum()
        self.engine.train()
        if self.pipe is not None:
            total = sum_from_last_stage(total)
        else:
            dist.all_reduce(total, group=self.dp_cp_group)
        loss = (total[0] / total[1]).item()
        ppl = math.exp(min(loss, 50))
        self.metrics.print(
            f"[valid] step {self.step} loss {loss:.4f} ppl {ppl:.3f} "
            f"({int(total[1].item())} tokens)"
        )
        self.metrics.scalars(self.step, {"valid/loss": loss, "valid/ppl": ppl})
        self.metrics.record(
            {
                "step": self.step,
                "valid_loss": loss,
                "valid_ppl": ppl,
                "valid_tokens": int(total[1].item()),
            }
        )
        return loss

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> None:
        state = TrainerState(
            step=self.step,
            consumed_samples=self.consumed_samples,
            skipped_steps=self.skipped_steps,
            config=self.cfg.to_dict(),
            topology=self._topology(),
            tp_layout=self.layout,
            versions=library_versions(),
            tokenizer=self._tokenizer_info(),
        )
        t0 = time.perf_counter()
        files = tokenizer_files(self.tokenizer)[1]
        # before the first checkpoint: fp32 weights + Adam's fp32 master copy and two moments
        estimate = 16 * self.num_params
        path = self.checkpoints.save(
            self.engine, self.step, state, rng.capture(), files, estimate_bytes=estimate
        )
        seconds = time.perf_counter() - t0
        if self.checkpoints.pending is not None:
            self.metrics.print(f"[ckpt] saving {path} in the background (blocked {seconds:.2f}s)")
        else:
            self.metrics.print(f"[ckpt] saved {path} in {seconds:.1f}s")

    def close(self) -> None:
        self.checkpoints.finish(why="before releasing the run dir")  # the lock outlives writers
        self.metrics.close()
        if self.lock is not None:
            self.lock.release()
        distributed.shutdown()
