"""Checkpoints and failures: bit-exact resume after SIGKILL, SIGTERM, a save killed mid-way,
corrupted shards, a dead rank, and non-finite losses."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import torch

from pretrain_runs import finish, losses, metrics, output, signal_all, start, train, wait_for

pytestmark = pytest.mark.slow

EXACT = [
    "training.train_steps=20",
    "checkpoint.interval=10",
    "model.hidden_dropout=0.1",
    "parallel.tensor=2",
]


def _tensors(obj, prefix=""):
    """Flatten every tensor in a (nested) checkpoint object to {path: tensor}."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_tensors(v, f"{prefix}/{k}"))
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            out.update(_tensors(v, f"{prefix}/{i}"))
    return out


def checkpoint_tensors(tag_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(tag_dir.rglob("*.pt")):
        obj = torch.load(f, map_location="cpu", weights_only=False)
        out.update(_tensors(obj, str(f.relative_to(tag_dir))))
    return out


#: checkpoint.async_save off and on (the same resume tests hold for both)
SAVES = pytest.mark.parametrize("saves", ["sync", "async"])


def _save_mode(saves: str) -> str:
    return f"checkpoint.async_save={'true' if saves == 'async' else 'false'}"


@pytest.fixture(scope="module")
def uninterrupted(wikitext_manifest, tmp_path_factory):
    """The uninterrupted run per ZeRO stage, trained once with synchronous saves and shared by the
    sync and async SIGKILL tests (an async run must reach the same step-20 tensors)."""
    runs: dict[int, Path] = {}

    def get(stage: int) -> Path:
        if stage not in runs:
            whole = tmp_path_factory.mktemp(f"uninterrupted-zero{stage}")
            args = (*EXACT, f"parallel.zero_stage={stage}", _save_mode("sync"))
            train(whole, wikitext_manifest, 4, *args)
            runs[stage] = whole
        return runs[stage]

    return get


@SAVES
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_bit_exact_resume_after_sigkill(wikitext_manifest, tmp_path, uninterrupted, stage, saves):
    zero, mode = f"parallel.zero_stage={stage}", _save_mode(saves)
    whole = uninterrupted(stage)

    broken = tmp_path / "killed"
    # the run waits there to be killed; a background save of step 10 completes at a later step
    at = 11 if saves == "sync" else 14
    hold = {"TWICING_FAULT_HOLD_BEFORE_STEP": f"{at}:300"}
    procs = start(broken, wikitext_manifest, 4, *EXACT, zero, mode, env=hold)
    wait_for(lambda: f"holding before step {at}" in output(procs, 0), 300, "step 10 done", procs)
    assert (broken / "checkpoints/step_00000010/COMPLETE").exists()
    signal_all(procs, signal.SIGKILL)
    finish(procs)
    assert (broken / "checkpoints/latest").read_text() == "step_00000010"
    resumed = train(broken, wikitext_manifest, 4, *EXACT, zero, mode)
    assert "resumed from step_00000010: step 10" in resumed[0][1]
    assert "step 10/20" not in resumed[0][1] and "step 11/20" in resumed[0][1]

    a, b = losses(whole), losses(broken)
    assert [a[s] for s in range(11, 21)] == [b[s] for s in range(11, 21)]  # bit for bit
    ta = checkpoint_tensors(whole / "checkpoints/step_00000020")
    tb = checkpoint_tensors(broken / "checkpoints/step_00000020")
    assert ta.keys() == tb.keys() and len(ta) > 10
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, different[:5]


@SAVES
def test_sigterm_checkpoints_exits_75_and_resumes_the_same_curve(
    wikitext_manifest, tmp_path, saves
):
    args = [
        "training.train_steps=12", "model.hidden_dropout=0.1", "parallel.zero_stage=2",
        "checkpoint.interval=2", _save_mode(saves),
    ]  # fmt: skip
    whole = tmp_path / "whole"
    train(whole, wikitext_manifest, 2, *args)

    run = tmp_path / "preempted"
    hold = {"TWICING_FAULT_HOLD_BEFORE_STEP": "5:300"}  # a fixed point, however fast steps are
    procs = start(run, wikitext_manifest, 2, *args, env=hold)
    wait_for(lambda: "holding before step 5" in output(procs, 0), 300, "4 steps", procs)
    assert len(metrics(run)) == 4
    signal_all(procs, signal.SIGTERM)
    codes = finish(procs)
    assert codes == [75, 75], [output(procs, r)[-2000:] for r in range(2)]
    tag = (run / "checkpoints/latest").read_text()
    stopped = int(tag.split("_")[1])
    assert stopped == 5 and (run / "checkpoints" / tag / "COMPLETE").exists()
    resumed = train(run, wikitext_manifest, 2, *args)
    assert f"resumed from {tag}: step {stopped}" in resumed[0][1]
    assert f"step {stopped + 1}/12" in resumed[0][1] and f"step {stopped}/12" not in resumed[0][1]
    assert losses(run) == losses(whole)


def test_sigkill_during_a_checkpoint_write_resumes_from_the_previous_one(
    wikitext_manifest, tmp_path
):
    args = ["training.train_steps=8", "checkpoint.interval=3", "parallel.zero_stage=1"]
    run = tmp_path / "run"
    procs = start(run, wikitext_manifest, 2, *args, env={"TWICING_FAULT_SAVE_PAUSE": "6:60"})
    wait_for(lambda: "[fault] pausing" in output(procs, 0), 300, "the step-6 save to pause", procs)
    assert (run / "checkpoints/step_00000006").is_dir()
    signal_all(procs, signal.SIGKILL)
    finish(procs)
    assert not (run / "checkpoints/step_00000006/COMPLETE").exists()
    assert (run / "checkpoints/latest").read_text() == "step_00000003"

    results = train(run, wikitext_manifest, 2, *args)
    assert "resumed from step_00000003: step 3" in results[0][1]
    assert (run / "checkpoints/step_00000006/COMPLETE").exists()  # re-saved whole
    assert (run / "checkpoints/latest").read_text() == "step_00000008"


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_shard_is_refused_naming_the_file(wikitext_manifest, tmp_path, damage):
    args = ["training.train_steps=4", "checkpoint.interval=4", "parallel.zero_stage=1"]
    run = tmp_path / "run"
    train(run, wikitext_manifest, 2, *args)
    tag_dir = run / "checkpoints/step_00000004"
    victim = sorted(tag_dir.glob("*optim_states.pt"))[-1]
    data = bytearray(victim.read_bytes())
    if damage == "truncate":
        victim.write_bytes(data[: len(data) // 2])
    else:
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(data)
    before = {p: p.stat().st_mtime_ns for p in tag_dir.rglob("*")}

    results = train(run, wikitext_manifest, 2, "training.train_steps=6", *args[1:], check=False)
    assert [rc for rc, _ in results] == [4, 4], results[0][1][-2000:]
    assert victim.name in results[0][1]
    assert ("truncated" if damage == "truncate" else "checksum mismatch") in results[0][1]
    assert "resumed from" not in results[0][1]
    assert {p: p.stat().st_mtime_ns for p in tag_dir.rglob("*")} == before
    assert sorted(losses(run)) == [1, 2, 3, 4]


def test_one_rank_killed_the_others_exit_nonzero_quickly(wikitext_manifest, tmp_path):
    run = tmp_path / "run"
    procs = start(
        run,
        wikitext_manifest,
        3,
        "training.train_steps=100000",
        "parallel.zero_stage=2",
        "training.global_batch_size=6",
    )
    wait_for(lambda: len(metrics(run)) >= 3, 300, "3 steps", procs)
    procs[1].kill()
    t0 = time.monotonic()
    codes = [p.wait(timeout=120) for p in (procs[0], procs[2])]
    elapsed = time.monotonic() - t0
    assert all(c != 0 for c in codes), codes
    assert elapsed < 60, f"survivors took {elapsed:.0f}s to exit"


@pytest.mark.parametrize("stage", [0, 2])
def test_nonfinite_loss_is_skipped_or_halts(wikitext_manifest, tmp_path, stage):
    args = ["training.train_steps=6", "checkpoint.interval=2", f"parallel.zero_stage={stage}"]
    nan = {"TWICING_FAULT_NAN_AT_STEP": "3"}  # the 4th step
    skip = tmp_path / "skip"
    train(skip, wikitext_manifest, 2, *args, "training.nonfinite=skip", env=nan)
    rows = {m["step"]: m for m in metrics(skip) if "loss" in m}
    assert rows[4]["skipped"] and not any(rows[s]["skipped"] for s in (1, 2, 3, 5, 6))
    assert all(torch.isfinite(torch.tensor(rows[s]["loss"])) for s in (5, 6))
    state = json.loads((skip / "checkpoints/step_00000006/trainer_state.json").read_text())
    assert state["skipped_steps"] == 1

    halt = tmp_path / "halt"
    results = train(
        halt, wikitext_manifest, 2, *args, "training.nonfinite=halt", env=nan, check=False
    )
    assert [rc for rc, _ in results] == [3, 3]
    assert "non-finite" in results[0][1]
    assert (halt / "checkpoints/latest").read_text() == "step_00000002"  # nothing saved after


def test_a_stop_signal_during_start_up_exits_75_without_training(wikitext_manifest, tmp_path):
    run = tmp_path / "run"
    procs = start(
        run, wikitext_manifest, 2, "training.train_steps=50", "parallel.zero_stage=1", fresh=True
    )
    time.sleep(1.0)  # inside the imports / process-group set-up, before any step
    signal_all(procs, signal.SIGUSR1)
    codes = finish(procs)
    assert codes == [75, 75], [output(procs, r)[-2000:] for r in range(2)]
    assert "stop requested before the first step" in output(procs, 0)
    assert metrics(run) == [] and not (run / "checkpoints" / "latest").exists()
