"""Background checkpoint saves (``checkpoint.async_save: true``) keep every integrity promise:
kill -9 at seeded random instants while writers are mid-file always leaves a complete, verified
checkpoint to resume from and a continuation identical to the uninterrupted run; a disk that
fills during a background write is exit 4 on every rank with the previous checkpoint intact;
too little host memory falls back to a synchronous save with a warning. (The resume tests of
test_pretrain_resume, test_reshard and the Slurm preemption test run with it too.)"""

from __future__ import annotations

import random
import signal
import subprocess
import time

import pytest
import torch

from pretrain_runs import finish, losses, output, signal_all, start, train, wait_for

pytestmark = pytest.mark.slow

ASYNC = ["checkpoint.async_save=true", "parallel.zero_stage=1"]


def _complete_steps_verify(ckpts) -> list[str]:
    """Every ``COMPLETE`` step directory passes verification (no missing or mismatched file);
    ``latest`` names one of them. Returns the complete tags."""
    from pretrain.checkpoint import layout

    tags = layout.complete_tags(ckpts)
    for tag in tags:
        assert layout.verify_files(ckpts / tag) == [], tag
        names = set(layout.read_checksums(ckpts / tag))
        on_disk = {
            str(p.relative_to(ckpts / tag)) for p in (ckpts / tag).rglob("*")
            if p.is_file() and p.name not in ("COMPLETE", "checksums.json")
        }  # fmt: skip
        assert names == on_disk, (tag, names ^ on_disk)
    if (ckpts / "latest").is_file():
        assert (ckpts / "latest").read_text() in tags
    return tags


def test_kill_9_at_random_instants_during_background_writes(wikitext_manifest, tmp_path):
    """20 kills, each at a seeded random moment while some rank's writer holds a file between
    writing it and renaming it into place; after every kill the complete checkpoints verify;
    the run finally resumes and its curve and weights equal the uninterrupted run's."""
    args = [*ASYNC, "training.train_steps=30", "checkpoint.interval=1", "checkpoint.keep_last=2",
            "model.hidden_dropout=0.1"]  # fmt: skip
    whole = tmp_path / "whole"
    train(whole, wikitext_manifest, 2, *args)
    run = tmp_path / "killed"
    rng = random.Random(20261207)
    hold = {"TWICING_FAULT_WRITER_HOLD": "0.1"}
    kills = 0
    while kills < 20:
        procs = start(run, wikitext_manifest, 2, *args, env=hold)
        # the n-th file the writers hold on (a save is 7 files: rank 0 five, rank 1 two), then a
        # random offset into the hold: on average about one save completes per start
        holds = rng.randint(1, 14)
        seen = lambda p=procs: sum(output(p, r).count("[fault] writer holding") for r in (0, 1))  # noqa: E731
        try:
            wait_for(lambda s=seen, n=holds: s() >= n, 120, f"{holds} writer holds", procs)
        except AssertionError:
            if all(p.poll() == 0 for p in procs):
                break  # the run finished before this kill: enough kills happened earlier
            raise
        time.sleep(rng.uniform(0.0, 0.1))
        signal_all(procs, signal.SIGKILL)
        finish(procs)
        kills += 1
        _complete_steps_verify(run / "checkpoints")
    assert kills == 20
    last = train(run, wikitext_manifest, 2, *args)
    resumed = int(last[0][1].split("resumed from step_")[1][:8])
    assert resumed >= 5, resumed  # the kills did not keep the run at its start
    print(f"20 kills at random instants in background writes; resumed from step {resumed}")
    assert losses(run) == losses(whole)  # every step, bit for bit (the last record of a step)
    tags = _complete_steps_verify(run / "checkpoints")
    assert tags[-1] == "step_00000030"
    from pretrain.checkpoint.reader import full_state_dict, open_checkpoint

    a, b = (full_state_dict(open_checkpoint(d)) for d in (whole, run))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def tmpfs(tmp_path):
    """A 6 MB tmpfs (root only; skipped where mounting is not allowed)."""
    point = tmp_path / "disk"
    point.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=6144k", "tmpfs", str(point)], capture_output=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    yield point
    subprocess.run(["umount", "-l", str(point)], check=False)


def test_a_disk_that_fills_during_a_background_write(wikitext_manifest, tmp_path, tmpfs):
    """Step 1 is saved; while step 2's writers hold their first file, the disk is filled: every
    rank exits 4 naming the path, the partial step directory is removed, step 1 stays
    ``latest`` and verifies."""
    args = [*ASYNC, "training.train_steps=3", "checkpoint.interval=1", f"checkpoint.dir={tmpfs}"]
    procs = start(tmp_path / "run", wikitext_manifest, 2, *args,
                  env={"TWICING_FAULT_WRITER_HOLD": "1.0"})  # fmt: skip
    wait_for(lambda: (tmpfs / "step_00000001" / "COMPLETE").exists(), 120, "step 1", procs)
    held = f"[fault] writer holding {tmpfs / 'step_00000002'}"
    wait_for(lambda: held in output(procs, 0), 120, "step 2's writer", procs)
    filler = tmpfs / "filler"
    subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=64k"], capture_output=True)
    codes = finish(procs)
    logs = [output(procs, r) for r in (0, 1)]
    assert codes == [4, 4], [log[-2000:] for log in logs]
    for log in logs:
        assert f"checkpoint save failed: no space left on {tmpfs}" in log, log[-2000:]
        assert "removed the partial" in log and "Traceback" not in log
    assert not (tmpfs / "step_00000002").exists()
    assert (tmpfs / "latest").read_text() == "step_00000001"
    filler.unlink()
    assert _complete_steps_verify(tmpfs) == ["step_00000001"]


def test_too_little_host_memory_falls_back_to_a_synchronous_save(wikitext_manifest, tmp_path):
    run = tmp_path / "run"
    args = [*ASYNC, "training.train_steps=2", "checkpoint.interval=1"]
    out = train(run, wikitext_manifest, 1, *args, env={"TWICING_FAULT_HOST_MEMORY": "1000"})
    log = out[0][1]
    assert log.count("too little host memory to stage") == 2
    assert "writing it synchronously this time" in log and "in the background (blocked" not in log
    assert "[ckpt] saved" in log
    assert _complete_steps_verify(run / "checkpoints") == ["step_00000001", "step_00000002"]
