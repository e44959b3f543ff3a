"""What ``pretrain.parallel.deepspeed_compat`` relies on in DeepSpeed, checked against the
installed version: a DeepSpeed upgrade that changes any of it fails here, loudly."""

from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path

import deepspeed
import pytest
import torch

from data_prep.base.errors import CheckpointError
from pretrain.parallel import deepspeed_compat as compat


class _Payload:
    """Unpickling this calls ``open(flag, "w")``: creates the flag file (code execution)."""

    def __init__(self, flag: Path):
        self.flag = str(flag)

    def __reduce__(self):
        return (open, (self.flag, "w"))


def _tampered(path: Path, flag: Path) -> Path:
    torch.save({"module": {"w": torch.ones(2)}, "extra": _Payload(flag)}, path)
    return path


def test_the_checked_deepspeed_release():
    assert deepspeed.__version__.startswith("0.19."), (
        f"DeepSpeed {deepspeed.__version__}: re-verify every assumption in "
        "pretrain/parallel/deepspeed_compat.py (its allow-list, the modules whose torch.load "
        "it guards, the converter's arguments, the ZeRO-3 universal repairs), then update this"
    )


@pytest.mark.parametrize("name", compat.GUARDED_MODULES)
def test_guarded_modules_call_torch_load_through_the_torch_module(name):
    """``safe_loads`` replaces ``torch.load``; a module that bound ``load`` itself (``from torch
    import load``) or read files another way would escape it."""
    module = importlib.import_module(name)
    source = inspect.getsource(module)
    assert module.torch is torch
    assert "from torch import load" not in source and "serialization.load(" not in source
    assert "pickle.load(" not in source


def test_deepspeeds_loaders_run_a_payload_unless_guarded(tmp_path):
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.utils import zero_to_fp32

    live = tmp_path / "live-flag"
    TorchCheckpointEngine().load(str(_tampered(tmp_path / "a.pt", live)))
    assert live.exists(), "the payload is real: DeepSpeed's own load runs it"

    flag = tmp_path / "flag"
    f = _tampered(tmp_path / "b.pt", flag)
    with compat.safe_loads(), pytest.raises(CheckpointError, match=r"b\.pt: refused to unpickle"):
        TorchCheckpointEngine().load(str(f))
    with compat.safe_loads(), pytest.raises(CheckpointError, match=r"b\.pt: refused"):
        zero_to_fp32.parse_model_states([str(f)])
    with pytest.raises(CheckpointError, match=r"b\.pt: refused .*GLOBAL io\.open"):
        compat.scan([f])
    assert not flag.exists()
    assert torch.load is compat._REAL_LOAD  # restored after the block


def test_the_allow_list_loads_what_deepspeed_writes(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    state = {
        "loss_scaler": LossScaler(scale=1.0),
        "zero_stage": ZeroStageEnum.optimizer_states,
        "param_slice_mappings": [{"w": fragment_address(numel=4, start=0)}],
        "fp32": torch.arange(4.0),
    }
    torch.save(state, tmp_path / "optim.pt")
    loaded = compat.safe_load(tmp_path / "optim.pt")
    assert loaded["zero_stage"] == 1 and loaded["loss_scaler"].cur_scale == 1.0
    assert loaded["param_slice_mappings"][0]["w"].numel == 4
    assert torch.equal(loaded["fp32"], torch.arange(4.0))


def test_the_universal_loading_switch_exists():
    from deepspeed.runtime.config import DeepSpeedConfig

    assert "self.load_universal_checkpoint" in inspect.getsource(DeepSpeedConfig)

    class Engine:
        class _config:  # noqa: N801 - DeepSpeed's attribute name
            load_universal_checkpoint = False

    with compat.universal_loading(Engine):
        assert Engine._config.load_universal_checkpoint is True
    assert Engine._config.load_universal_checkpoint is False


def test_ds_to_universal_takes_exactly_our_arguments(monkeypatch):
    from deepspeed.checkpoint import ds_to_universal

    monkeypatch.setattr(
        sys, "argv", ["ds_to_universal", "--input_folder", "a", "--output_folder", "b"]
    )
    theirs = vars(ds_to_universal.parse_arguments())
    ours = vars(compat.ds_to_universal_args(Path("a"), Path("b"), 1))
    assert set(theirs) == set(ours)


def _two_group_engine(stage: int):
    """A tiny model in a real ZeRO engine with two parameter groups (weights decayed, biases
    not), torch's fused AdamW as in training."""
    import os

    from pretrain.parallel.mpu import MegatronMPU

    os.environ.setdefault("LOCAL_RANK", "0")

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    groups = [
        {"params": [model[0].weight, model[2].weight], "weight_decay": 0.1},
        {"params": [model[0].bias, model[2].bias], "weight_decay": 0.0},
    ]
    config = {
        "train_batch_size": 1,
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        # what the trainer's DeepSpeed config asks for (pretrain/parallel/ds_config.py)
        "optimizer": {"type": "AdamW", "params": {"lr": 0.01, "torch_adam": True, "fused": True}},
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
    }
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=groups, config=config, mpu=MegatronMPU()
    )
    return engine


def test_the_zero3_universal_loader_still_has_the_slips_we_repair(one_rank, tmp_path):
    """A real ZeRO-3 save, converted by ``ds_to_universal`` and loaded back by DeepSpeed's own
    universal loader: the bias group comes back with the weight group's decay and every group
    shares one ``step`` tensor (the slips); ``fix_zero3_universal_load`` repairs both. When
    DeepSpeed fixes them this test fails: then the repair can go."""
    from deepspeed.checkpoint import ds_to_universal
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_INFO,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
    )

    engine = _two_group_engine(3)
    for _ in range(2):
        engine(torch.randn(1, 8)).sum().backward()
        engine.step()
    info = {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: 0.2}}
    engine.save_checkpoint(str(tmp_path / "ck"), tag="t", client_state=info)
    ds_to_universal.main(compat.ds_to_universal_args(tmp_path / "ck/t", tmp_path / "u/t", 1))

    resumed = _two_group_engine(3)
    with compat.universal_loading(resumed), compat.safe_loads():
        resumed.load_checkpoint(str(tmp_path / "u"), tag="t", load_lr_scheduler_states=False)
    inner = resumed.optimizer.optimizer
    steps = [s["step"] for s in inner.state.values()]
    assert [g["weight_decay"] for g in inner.param_groups] == [0.1, 0.1]  # slip 1
    assert len(steps) == 2 and steps[0] is steps[1]  # slip 2

    compat.fix_zero3_universal_load(inner, tmp_path / "u/t")
    steps = [s["step"] for s in inner.state.values()]
    assert [g["weight_decay"] for g in inner.param_groups] == [0.1, 0.0]
    assert steps[0] is not steps[1] and [int(x) for x in steps] == [2, 2]


def test_deepspeed_skips_pipeline_replicated_params_in_its_grad_norm(one_rank):
    """``mark_pipeline_replicated`` sets the attribute the ZeRO-1/2 gradient norm skips."""
    from deepspeed.runtime import constants

    assert constants.PIPE_REPLICATED == compat.PIPE_REPLICATED
    optimizer = _two_group_engine(1).optimizer
    params = [p for group in optimizer.bit16_groups for p in group]
    grads = [torch.ones_like(p) for p in params]
    every = float(optimizer.get_grad_norm_direct(grads, params)) ** 2
    compat.mark_pipeline_replicated(params[0])
    assert compat.is_pipeline_replicated(params[0]) and not compat.is_pipeline_replicated(params[1])
    without = float(optimizer.get_grad_norm_direct(grads, params)) ** 2
    assert every == pytest.approx(sum(p.numel() for p in params))
    assert without == pytest.approx(every - params[0].numel())


def test_the_names_loading_the_groups_the_save_lacked_uses_exist(one_rank):
    """``load_groups_the_save_lacked`` repeats DeepSpeed's own per-group universal loading for
    the groups beyond the saved count, with DeepSpeed's private names: every one of them must
    still exist on a real ZeRO-1 engine and mean what DeepSpeed's loop makes of it."""
    from deepspeed.checkpoint.universal_checkpoint import enable_universal_checkpoint
    from deepspeed.runtime import base_optimizer
    from deepspeed.utils.tensor_fragment import map_to_flat_opt_states

    engine = _two_group_engine(1)
    engine(torch.randn(1, 8)).sum().backward()
    engine.step()  # Adam's states exist after a step
    optimizer = engine.optimizer
    lps = [lp for group in optimizer.bit16_groups for lp in group]
    enable_universal_checkpoint(lps)  # what DeepSpeed does before a universal load
    assert len(optimizer.bit16_groups) == len(optimizer.optimizer.param_groups) == 2
    for lp in lps:
        assert lp._hp_mapping is not None
        assert set(lp._hp_mapping.get_optim_state_keys()) <= {"exp_avg", "exp_avg_sq"}
        assert callable(lp.load_hp_checkpoint_state)
        assert optimizer.param_names[lp] in dict(engine.module.named_parameters())
    assert optimizer.mpu.get_tensor_model_parallel_rank() == 0
    assert list(inspect.signature(map_to_flat_opt_states).parameters) == [
        "flat_hp_tensor", "lp_tensors", "optim_state", "opt_keys"
    ]  # fmt: skip
    loop = inspect.getsource(
        base_optimizer.ZeROOptimizer.load_hp_checkpoint_state_from_checkpoint_dir
    )
    for used in (
        "lp._hp_mapping", "lp.load_hp_checkpoint_state(", "self.param_names[lp]",
        "_hp_mapping.get_optim_state_keys()", "map_to_flat_opt_states(hp_param, lp_groups[i]",
    ):  # fmt: skip
        assert used in loop, used


def test_deepspeed_writes_checkpoints_through_its_checkpoint_engine(tmp_path):
    """``route_save_writes`` wraps ``engine.checkpoint_engine.save``/``makedirs``: DeepSpeed's
    save path must write through them (and only them)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.engine import DeepSpeedEngine

    for method in ("_save_checkpoint", "_save_zero_checkpoint", "save_checkpoint"):
        source = inspect.getsource(getattr(DeepSpeedEngine, method))
        assert "torch.save(" not in source, method
    source = inspect.getsource(DeepSpeedEngine)
    assert "self.checkpoint_engine.save(" in source and "self.checkpoint_engine.makedirs(" in source
    # the one other write: zero_to_fp32.py copied beside the checkpoints
    assert source.count("copyfile(") == 1 and "self._copy_recovery_script(" in source
    assert "copyfile(" in inspect.getsource(DeepSpeedEngine._copy_recovery_script)

    class Engine:
        checkpoint_engine = TorchCheckpointEngine()

        def _copy_recovery_script(self, save_path):
            raise OSError(28, "No space left on device", save_path)

    from pretrain.checkpoint.save_errors import SaveErrors

    guard = SaveErrors()
    target = tmp_path / "missing-dir" / "x.pt"
    engine = Engine()
    with compat.route_save_writes(engine, guard):
        engine._copy_recovery_script(str(tmp_path))
        engine.checkpoint_engine.save({"a": torch.ones(1)}, str(tmp_path / "y.pt"))  # skipped
    assert [p for p, _ in guard.errors] == [str(tmp_path)] and not (tmp_path / "y.pt").exists()
    guard = SaveErrors()
    with compat.route_save_writes(engine, guard):
        engine.checkpoint_engine.save({"a": torch.ones(1)}, str(target))  # no such directory
    assert [p for p, _ in guard.errors] == [str(target)]
    assert "save" not in vars(engine.checkpoint_engine)  # the real methods again
    assert "_copy_recovery_script" not in vars(engine)


# ------------------------------------------------------------------------- training workarounds
def _zero_engine(stage: int, *, reset: bool):
    import os

    import deepspeed

    os.environ.setdefault("LOCAL_RANK", "0")
    from pretrain.parallel.mpu import MegatronMPU

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    config = {
        "train_batch_size": 1,
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,
        "steps_per_print": 2**31 - 1,
    }
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=list(model.parameters()), config=config, mpu=MegatronMPU()
    )
    if reset:
        compat.reset_backward_state_per_backward(engine)
    return engine


def _two_forwards_then_two_backwards(engine) -> list[torch.Tensor]:
    """1F1B's cool-down: two backwards with no forward between them, then one step."""
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(1))
    first, second = engine(x[:1]), engine(x[1:])
    first.sum().backward()
    second.sum().backward()
    engine.step()
    return [p.detach().clone() for p in engine.module.parameters()]


@pytest.mark.parametrize("stage", [1, 2])
def test_consecutive_backwards_need_the_reset_and_get_it(one_rank, stage):
    """Reference: the same SGD step on the summed gradient of both samples, in plain torch."""
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(1))
    ref(x).sum().backward()
    with torch.no_grad():
        expected = [p - 0.1 * p.grad for p in ref.parameters()]

    fixed = _zero_engine(stage, reset=True)
    got = _two_forwards_then_two_backwards(fixed)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, expected, strict=True))
    assert fixed.optimizer._backward_active_depth == 0
    # DeepSpeed 0.19 itself leaves the second backward's bookkeeping open (and ZeRO-2, which
    # reduces in its hooks, takes a wrong step): when this stops failing the workaround can go
    broken = _zero_engine(stage, reset=False)
    got = _two_forwards_then_two_backwards(broken)
    assert broken.optimizer._backward_active_depth != 0
    if stage == 2:
        assert not all(torch.allclose(a, b, atol=1e-3) for a, b in zip(got, expected, strict=True))


def test_the_private_names_the_training_workarounds_use_exist():
    from deepspeed.runtime import base_optimizer
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    for name in ("_backward_prologue", "buffered_allreduce_fallback"):
        assert callable(getattr(DeepSpeedEngine, name)), name
    assert "self.enable_backward_allreduce" in inspect.getsource(DeepSpeedEngine)
    for name in (
        "clear_backward_seen_flag",
        "get_param_gradient_attribute",
        "finalize_gradient_accumulation_boundary",
        "_load_universal_checkpoint",
    ):
        assert callable(getattr(DeepSpeedZeroOptimizer, name)), name
    source = inspect.getsource(DeepSpeedZeroOptimizer)
    assert "self.averaged_gradients[i] =" in source and "self.bit16_groups" in source
    # universal loading still pairs groups by position: a group the save lacked is skipped
    loader = inspect.getsource(
        base_optimizer.ZeROOptimizer.load_hp_checkpoint_state_from_checkpoint_dir
    )
    assert "zip(self.optimizer.param_groups, optim_sd['param_groups'])" in loader
    assert isinstance(base_optimizer.ZeROOptimizer._backward_active_depth, property)
