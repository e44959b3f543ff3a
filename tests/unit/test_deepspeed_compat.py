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

from pretrain.errors import CheckpointError
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


def test_the_zero3_universal_loader_still_has_the_slips_we_repair():
    """``fix_zero3_universal_load`` reads ``zero/optimizer_state.pt`` and repairs param-group
    hyperparameters and a shared ``step`` tensor: both still come from this loader."""
    from deepspeed.runtime.zero import stage3

    source = inspect.getsource(stage3.DeepSpeedZeroOptimizer_Stage3._load_universal_checkpoint)
    source += inspect.getsource(stage3)
    assert "optimizer_state.pt" in source or "optimizer_state" in source
    assert "param_groups" in source


def test_deepspeed_writes_checkpoints_through_its_checkpoint_engine(tmp_path):
    """``collect_save_errors`` wraps ``engine.checkpoint_engine.save``/``makedirs``: DeepSpeed's
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

    errors: list = []
    target = tmp_path / "missing-dir" / "x.pt"
    engine = Engine()
    with compat.collect_save_errors(engine, errors):
        engine._copy_recovery_script(str(tmp_path))
        engine.checkpoint_engine.save({"a": torch.ones(1)}, str(tmp_path / "y.pt"))  # skipped
    assert [p for p, _ in errors] == [str(tmp_path)] and not (tmp_path / "y.pt").exists()
    errors.clear()
    with compat.collect_save_errors(engine, errors):
        engine.checkpoint_engine.save({"a": torch.ones(1)}, str(target))  # no such directory
    assert [p for p, _ in errors] == [str(target)]
    assert "save" not in vars(engine.checkpoint_engine)  # the real methods again
    assert "_copy_recovery_script" not in vars(engine)
