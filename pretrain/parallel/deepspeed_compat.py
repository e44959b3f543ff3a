"""Every place the project leans on DeepSpeed 0.19 internals, in one module.

``tests/unit/test_deepspeed_compat.py`` checks each assumption against the installed DeepSpeed,
so an upgrade that changes one fails there, loudly, instead of silently re-opening a hole.

* **Pickle safety.** DeepSpeed reads checkpoint files with ``torch.load(weights_only=False)``
  (its ``TorchCheckpointEngine.load``, ``ds_to_universal``, ``zero_to_fp32``, the universal
  loaders), which runs any code a tampered ``*.pt`` carries. Inside :func:`safe_loads`,
  ``torch.load`` is :func:`safe_load`: ``weights_only=True`` with the
  allow-list :data:`ALLOWED` of the few DeepSpeed types its files hold (a loss-scaler object,
  an enum, a dataclass of offsets: built from their fields, nothing called). A file with any
  other global is refused (``CheckpointError`` naming the file and the global), unless the run
  sets ``checkpoint.trust_pickles=true`` (then DeepSpeed loads as it always did). DeepSpeed's
  converter fork()s its worker processes, which inherit the replacement.
* **Failed saves**: :func:`route_save_writes` sends the engine's checkpoint-engine writes
  (``save``, ``makedirs``) and its private ``_copy_recovery_script`` (``zero_to_fp32.py``
  copied beside the checkpoints) through the checkpoint manager's one write guard, which records
  an error instead of raising, so a rank whose disk fails still runs through
  ``save_checkpoint``'s barriers and every rank can agree on the outcome.
* **Universal loading**: ``engine._config.load_universal_checkpoint`` is flipped for one
  ``load_checkpoint`` call (:func:`universal_loading`).
* **Universal conversion**: ``ds_to_universal.main`` takes an ``argparse.Namespace`` with the
  fields its CLI defines (:func:`ds_to_universal_args`).
* **ZeRO-3 universal load**: two slips of its loader are repaired
  (:func:`fix_zero3_universal_load`).

Training:

* **No backward all-reduce**: ``engine.enable_backward_allreduce`` is turned off where there is
  nothing to average (ZeRO-0 at DP 1) or where the pipeline step reduces itself
  (:func:`disable_backward_allreduce`); ``engine.buffered_allreduce_fallback`` does that
  reduction (:func:`allreduce_gradients_now`).
* **Consecutive backwards** (pipeline 1F1B cool-down): DeepSpeed resets its ZeRO backward-hook
  bookkeeping only in ``engine.forward``; :func:`reset_backward_state_per_backward` wraps
  ``engine._backward_prologue`` to reset it (``optimizer.clear_backward_seen_flag``) whenever no
  backward is active (``optimizer._backward_active_depth == 0``).
* **The tied copy counted once**: the last stage's copy of a tied embedding carries
  ``ds_pipe_replicated`` (:func:`mark_pipeline_replicated`), which DeepSpeed's gradient norms
  skip; our ZeRO-0 norm skips it the same way.
* **Tied embedding under ZeRO-1/2**: its gradient is read with
  ``optimizer.get_param_gradient_attribute``; under ZeRO-2 (reduced during backward) the tied
  weight sits alone in a parameter group and ``optimizer.finalize_gradient_accumulation_boundary``
  is wrapped to all-reduce that group's ``averaged_gradients`` across the embedding group
  (:func:`sum_tied_group_at_boundary`). Universal loading pairs the optimizer's groups with the
  saved ones by position (``zip``), so a group the saved optimizer lacked (the tied one) is
  loaded here after DeepSpeed's loop, as that loop does (:func:`load_groups_the_save_lacked`).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import pickle
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from data_prep.base.errors import CheckpointError

#: the DeepSpeed modules whose ``torch.load`` calls read checkpoint files (the test checks each
#: calls it as ``torch.load``, the attribute :func:`safe_loads` replaces)
GUARDED_MODULES = (
    "deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine",
    "deepspeed.runtime.engine",
    "deepspeed.runtime.zero.stage3",
    "deepspeed.runtime.zero.stage_1_and_2",
    "deepspeed.runtime.bf16_optimizer",
    "deepspeed.checkpoint.ds_to_universal",
    "deepspeed.checkpoint.universal_checkpoint",
    "deepspeed.checkpoint.deepspeed_checkpoint",
    "deepspeed.checkpoint.zero_checkpoint",
    "deepspeed.utils.zero_to_fp32",
)
#: ``module:qualname`` of every non-torch type DeepSpeed 0.19 writes into a checkpoint
ALLOWED_NAMES = (
    "deepspeed.runtime.fp16.loss_scaler:LossScaler",
    "deepspeed.runtime.fp16.loss_scaler:DynamicLossScaler",
    "deepspeed.runtime.zero.config:ZeroStageEnum",
    "deepspeed.utils.tensor_fragment:fragment_address",
)
_REAL_LOAD = torch.load


@functools.cache
def allowed() -> list[Any]:
    """The allow-listed types themselves (imported on first use)."""
    import importlib

    out = []
    for name in ALLOWED_NAMES:
        module, _, qualname = name.partition(":")
        out.append(getattr(importlib.import_module(module), qualname))
    return out


def safe_load(f: Any, map_location: Any = "cpu", **kwargs: Any) -> Any:
    """``torch.load(f, weights_only=True)`` with :data:`ALLOWED`; a file holding anything else
    (e.g. a pickled call) is a ``CheckpointError`` naming it, and nothing in it runs."""
    kwargs.pop("weights_only", None)
    try:
        with torch.serialization.safe_globals(allowed()):
            return _REAL_LOAD(f, map_location=map_location, weights_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        reason = next(
            (ln.strip() for ln in str(e).splitlines() if "Unsupported" in ln or "global" in ln),
            str(e).splitlines()[0] if str(e) else type(e).__name__,
        )
        raise CheckpointError(
            f"{f}: refused to unpickle ({reason.split(' was not')[0]}): checkpoint files may "
            "hold only tensors, plain containers and the allow-listed DeepSpeed types, so this "
            "one was altered or written by other code. Nothing in it was run. If you trust it, "
            "resume with checkpoint.trust_pickles=true"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{f}: unreadable checkpoint file ({type(e).__name__}: {e})") from e


def _guarded_load(f: Any, map_location: Any = None, *args: Any, **kwargs: Any) -> Any:
    if args:  # torch.load's positional pickle_module: not ours to honour
        raise CheckpointError(f"{f}: unexpected torch.load arguments {args!r}")
    return safe_load(f, map_location=map_location, **kwargs)


@contextlib.contextmanager
def safe_loads(trust_pickles: bool = False) -> Iterator[None]:
    """Within the block every ``torch.load`` — DeepSpeed's included, which all call it as
    ``torch.load`` (checked by the test) — is :func:`safe_load` (``trust_pickles``: leave
    DeepSpeed's loads as they are)."""
    if trust_pickles or torch.load is _guarded_load:
        yield
        return
    torch.load = _guarded_load
    try:
        yield
    finally:
        torch.load = _REAL_LOAD


def scan(paths: list[Path]) -> None:
    """Refuse (``CheckpointError`` naming the file) any of ``paths`` that :func:`safe_load`
    would refuse; cheap: tensors are memory-mapped, not read."""
    for path in paths:
        try:
            safe_load(path, mmap=True)
        except CheckpointError as e:
            if "refused" in str(e):
                raise
            safe_load(path)  # the legacy (non-zip) format cannot be memory-mapped


@contextlib.contextmanager
def route_save_writes(engine: Any, guard: Callable[..., None]) -> Iterator[None]:
    """Within the block every write of ``engine.save_checkpoint`` goes through ``guard``: its
    checkpoint engine's ``save(state_dict, path)`` as ``guard.save_state(path, state_dict,
    save)`` (written now by the manager's ``SaveErrors``, staged for the background writer by
    ``async_save.StagedSave``), its ``makedirs`` and the private ``_copy_recovery_script``
    (``zero_to_fp32.py`` copied beside the checkpoints) as ``guard(path, write, inject=…)``.
    Either guard records a failure instead of raising."""
    ce = engine.checkpoint_engine
    real_save, real_makedirs = ce.save, ce.makedirs
    real_copy = engine._copy_recovery_script  # the only write outside the checkpoint engine

    def save(state_dict: Any, path: str) -> None:
        guard.save_state(path, state_dict, real_save)

    def makedirs(path: str, exist_ok: bool = False) -> None:
        guard(path, lambda: real_makedirs(path, exist_ok=exist_ok), inject=False)

    def copy_recovery_script(save_path: str) -> None:
        guard(save_path, lambda: real_copy(save_path), inject=False)

    ce.save, ce.makedirs = save, makedirs
    engine._copy_recovery_script = copy_recovery_script
    try:
        yield
    finally:
        for name in ("save", "makedirs"):
            ce.__dict__.pop(name, None)  # the class's methods again
        vars(engine).pop("_copy_recovery_script", None)


@contextlib.contextmanager
def universal_loading(engine: Any) -> Iterator[None]:
    """Make ``engine.load_checkpoint`` read a DeepSpeed universal checkpoint for one call."""
    previous = engine._config.load_universal_checkpoint
    engine._config.load_universal_checkpoint = True
    try:
        yield
    finally:
        engine._config.load_universal_checkpoint = previous


def ds_to_universal_args(input_dir: Path, output_dir: Path, workers: int) -> argparse.Namespace:
    """The arguments ``deepspeed.checkpoint.ds_to_universal.main`` reads."""
    return argparse.Namespace(
        input_folder=str(input_dir),
        output_folder=str(output_dir),
        num_extract_workers=workers,
        num_merge_workers=workers,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=False,
    )


def fix_zero3_universal_load(optimizer: Any, universal_dir: Path) -> None:
    """Repair two slips of DeepSpeed 0.19's ZeRO-3 universal loader (``optimizer``: the base
    torch optimizer inside the ZeRO-3 optimizer).

    * It gives every parameter group the *first* saved group's hyperparameters, so the no-decay
      group (biases, norms) would resume with weight decay.
    * It stores one ``step`` tensor object in every group's state; Adam increments it in place,
      once per group per step, so bias correction would run ahead.

    Either makes the resumed run drift from the original (3e-3 in the loss 2 steps after the
    resume on the tiny test model); with both fixed it follows the original run.
    """
    saved = safe_load(Path(universal_dir) / "zero" / "optimizer_state.pt").get("param_groups")
    if not saved or len(saved) != len(optimizer.param_groups):
        raise CheckpointError(
            f"{universal_dir}: {len(saved or [])} saved parameter groups for "
            f"{len(optimizer.param_groups)} in this run"
        )
    for group, values in zip(optimizer.param_groups, saved, strict=True):
        group.update({k: v for k, v in values.items() if k != "params"})
    for state in optimizer.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()


# ---------------------------------------------------------------------------------- training


#: the parameter attribute DeepSpeed's gradient norms skip (``deepspeed.runtime.constants``)
PIPE_REPLICATED = "ds_pipe_replicated"


def mark_pipeline_replicated(param: torch.nn.Parameter) -> None:
    """Tell DeepSpeed's gradient-norm code that ``param`` is a copy another pipeline stage also
    holds (the last stage's tied embedding), so it is counted once."""
    setattr(param, PIPE_REPLICATED, True)


def is_pipeline_replicated(param: torch.nn.Parameter) -> bool:
    return bool(getattr(param, PIPE_REPLICATED, False))


def disable_backward_allreduce(engine: Any) -> None:
    """Stop DeepSpeed's own (ZeRO-0) gradient all-reduce at the end of each backward."""
    engine.enable_backward_allreduce = False


def allreduce_gradients_now(engine: Any) -> None:
    """Average ``param.grad`` over data parallel now (ZeRO-0), as DeepSpeed would at a boundary."""
    engine.buffered_allreduce_fallback()


def reset_backward_state_per_backward(engine: Any) -> None:
    """Let backwards follow each other without a forward between them (ZeRO-1/2)."""
    optimizer = engine.optimizer
    prologue = engine._backward_prologue

    @functools.wraps(prologue)
    def reset_then_prologue(*args: Any, **kwargs: Any) -> Any:
        if optimizer._backward_active_depth == 0:
            optimizer.clear_backward_seen_flag()
        return prologue(*args, **kwargs)

    engine._backward_prologue = reset_then_prologue


def tied_gradient(engine: Any, param: torch.Tensor) -> torch.Tensor | None:
    """The accumulated gradient of ``param`` as the engine's optimizer keeps it (before step)."""
    get = getattr(engine.optimizer, "get_param_gradient_attribute", None)
    return get(param) if get is not None else param.grad


def sum_tied_group_at_boundary(engine: Any, group_index: int, group: Any) -> None:
    """ZeRO-2: after DeepSpeed reduces a step's gradients into partitions, sum the partition of
    parameter group ``group_index`` (the tied embedding alone) over ``group`` (first and last
    pipeline stage hold identical partitions of it)."""
    optimizer = engine.optimizer
    finalize = optimizer.finalize_gradient_accumulation_boundary

    @functools.wraps(finalize)
    def finalize_then_sum(*args: Any, **kwargs: Any) -> Any:
        out = finalize(*args, **kwargs)
        grads = optimizer.averaged_gradients.get(group_index)
        for g in [grads] if isinstance(grads, torch.Tensor) else grads or []:
            torch.distributed.all_reduce(g, group=group)
        return out

    optimizer.finalize_gradient_accumulation_boundary = finalize_then_sum


def load_groups_the_save_lacked(engine: Any) -> None:
    """ZeRO-1/2 universal loading: also restore parameter groups beyond the saved count."""
    optimizer = engine.optimizer
    original = optimizer._load_universal_checkpoint

    @functools.wraps(original)
    def load_then_the_rest(checkpoint_folder, *args: Any, **kwargs: Any) -> Any:
        out = original(checkpoint_folder, *args, **kwargs)
        from deepspeed.utils.tensor_fragment import map_to_flat_opt_states

        zero = Path(checkpoint_folder) / "zero"
        saved = safe_load(zero / "optimizer_state.pt")["param_groups"]
        groups = optimizer.optimizer.param_groups
        tp_rank = optimizer.mpu.get_tensor_model_parallel_rank()
        tp_size = optimizer.mpu.get_tensor_model_parallel_world_size()
        for i in range(len(saved), len(groups)):
            keys: set[str] = set()
            steps = []
            for lp in optimizer.bit16_groups[i]:
                if lp._hp_mapping is not None:
                    path = str(zero / optimizer.param_names[lp])
                    steps.append(lp.load_hp_checkpoint_state(path, tp_rank, tp_size))
                    keys.update(lp._hp_mapping.get_optim_state_keys())
            hp = groups[i]["params"][0]
            if steps and steps[0] is not None:
                optimizer.optimizer.state[hp]["step"] = steps[0]
            map_to_flat_opt_states(hp, optimizer.bit16_groups[i], optimizer.optimizer.state, keys)
            for key in ("lr", "betas", "eps"):
                if key in saved[0]:
                    groups[i][key] = saved[0][key]
        return out

    optimizer._load_universal_checkpoint = load_then_the_rest
