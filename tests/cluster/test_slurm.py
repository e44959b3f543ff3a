"""slurm/ on a real 2-node Slurm 22.05 cluster (../shared/slurm-sandbox: munge, slurmctld, two
slurmd's on this host). The project's sbatch scripts are submitted unchanged; a tiny twicing GPT
trains across the two nodes, is preempted / hits its time limit, checkpoints, requeues and
resumes the same loss curve, fails fast when a rank dies, and chains perplexity evaluation."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import need_shared
from slurm_jobs import (
    ROOT,
    SLURM_DIR,
    Sandbox,
    job,
    job_env,
    rank_pid,
    sbatch,
    wait_for,
    wait_job,
)

from pretrain_runs import TINY, losses

#: 2 nodes x 2 CPUs on 2 real cores: everything is slow to start, requeues wait ~30-70 s
START_S, RUN_S, REQUEUE_S = 120, 240, 300
STEPS = 40
COMMON = [*TINY, "parallel.tensor=2", f"training.train_steps={STEPS}", "checkpoint.interval=5"]


def _need_root_and_ci_rules() -> None:
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("the Slurm sandbox needs root, and CI must run these tests")
        pytest.skip("the Slurm sandbox (munge, slurmctld, slurmd) needs root")


@pytest.fixture(scope="module")
def cluster():
    """A real 2-node Slurm cluster for this module: up.sh before, down.sh after."""
    sandbox = need_shared("slurm-sandbox")
    _need_root_and_ci_rules()
    box = Sandbox(sandbox / "up.sh", sandbox / "down.sh")
    box.start()
    yield box
    box.stop()


class Run:
    """One pretraining run submitted with slurm/pretrain.sbatch (possibly several jobs)."""

    def __init__(self, base: Path, manifest: Path, name: str, tasks_per_node: int, *extra: str):
        self.base, self.name, self.tasks_per_node = base, name, tasks_per_node
        self.run_dir = base / name
        self.logs = base / f"{name}-logs"
        self.args = [
            "configs/demo.yaml",
            f"run_dir={self.run_dir}",
            f"data.manifest={manifest}",
            *COMMON,
            *extra,
        ]

    def submit(self, *options: str, **env: str) -> str:
        opts = [
            "--nodes=2",
            f"--ntasks-per-node={self.tasks_per_node}",
            f"--job-name={self.name}",
            f"--output={self.base}/%x-%j.out",
            *options,
        ]
        return sbatch("pretrain.sbatch", opts, self.args, job_env(self.logs, **env))

    def batch_log(self, jid: str) -> str:
        path = self.base / f"{self.name}-{jid}.out"
        return path.read_text() if path.exists() else ""

    def rank_log(self, jid: str, rank: int) -> str:
        path = self.logs / f"{self.name}-{jid}-rank{rank}.log"
        return path.read_text() if path.exists() else ""

    def steps_logged(self) -> int:
        return len(losses(self.run_dir))


def _checkpoint_complete(run_dir: Path, step: int) -> bool:
    return (run_dir / "checkpoints" / f"step_{step:08d}" / "COMPLETE").exists()


def _run_to_completion(run: Run) -> tuple[str, dict[str, str], float]:
    t0 = time.monotonic()
    jid = run.submit()
    info = wait_job(jid, START_S + RUN_S, log=run.base / f"{run.name}-{jid}.out")
    return jid, info, time.monotonic() - t0


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    # a path with a space, quotes and shell syntax: must reach the trainer verbatim
    path = tmp_path_factory.mktemp("slurm") / "runs $(touch INJECTED); 'x'"
    path.mkdir()
    return path


@pytest.fixture(scope="module")
def tp_across_nodes(cluster, wikitext_manifest, base):
    """2 nodes x 1 task: TP=2 with one shard per node."""
    run = Run(base, wikitext_manifest, "tp2x1", 1)
    return run, *_run_to_completion(run)


@pytest.fixture(scope="module")
def tp_and_dp(cluster, wikitext_manifest, base):
    """2 nodes x 2 tasks: TP=2 inside each node, DP=2 across nodes."""
    run = Run(base, wikitext_manifest, "tp2dp2", 2)
    return run, *_run_to_completion(run)


def _assert_trained(run: Run, jid: str, info: dict[str, str], world: int) -> None:
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", info
    assert info["Restarts"] == "0" and info["NumNodes"] == "2", info
    for rank in range(world):  # every rank's log, on the node Slurm put it
        log = run.rank_log(jid, rank)
        node = f"sbx-node{1 + rank // (world // 2)}"
        assert f"{rank}: [rank {rank}/{world} node {node} local {rank % (world // 2)}]" in log
        assert f"{rank}: [rank {rank}] exit code 0" in log
    log0 = run.rank_log(jid, 0)
    assert f"TP 2 × DP {world // 2}" in log0
    assert f"[train] step {STEPS}/{STEPS}" in log0
    assert "training finished" in run.batch_log(jid)
    curve = losses(run.run_dir)
    assert sorted(curve) == list(range(1, STEPS + 1))
    assert curve[STEPS] < curve[1] - 0.5
    tag = run.run_dir / "checkpoints" / f"step_{STEPS:08d}"
    assert (run.run_dir / "checkpoints/latest").read_text() == tag.name
    assert (tag / "COMPLETE").exists()
    shards = {p.name for p in tag.glob("*.pt")}
    for tp in range(2):  # one model shard per TP rank, one optimizer shard per (DP, TP) rank
        assert f"mp_rank_{tp:02d}_model_states.pt" in shards
        for dp in range(world // 2):
            assert f"zero_pp_rank_{dp}_mp_rank_{tp:02d}_optim_states.pt" in shards
    assert len(shards) == 2 + world
    assert not (ROOT / "INJECTED").exists() and not (run.base.parent / "INJECTED").exists()


def test_two_nodes_one_task_each_tensor_parallel_across_nodes(tp_across_nodes):
    run, jid, info, seconds = tp_across_nodes
    _assert_trained(run, jid, info, world=2)
    print(f"2 nodes x 1 task, {STEPS} steps: {seconds:.0f}s")


def test_two_nodes_two_tasks_each_tensor_and_data_parallel(tp_and_dp):
    run, jid, info, seconds = tp_and_dp
    _assert_trained(run, jid, info, world=4)
    print(f"2 nodes x 2 tasks, {STEPS} steps: {seconds:.0f}s")


def test_two_nodes_pipeline_parallel_one_stage_per_node(cluster, wikitext_manifest, base):
    """PP=2 with stage 0 on the first node and stage 1 on the second (megatron's 1F1B over gloo
    p2p between the nodes) trains exactly the curve the same layout trains on one host."""
    from launch import run as run_here

    extra = ("parallel.tensor=1", "parallel.pipeline=2")
    run = Run(base, wikitext_manifest, "pp2", 1, *extra)
    jid, info, seconds = _run_to_completion(run)
    assert info["JobState"] == "COMPLETED" and info["NumNodes"] == "2", info
    for rank in range(2):
        assert f"{rank}: [rank {rank}/2 node sbx-node{rank + 1} local 0]" in run.rank_log(jid, rank)
    assert "TP 1 × DP 1 × PP 2" in run.rank_log(jid, 0)
    here = base / "pp2-one-host"
    args = ["--config", run.args[0], f"run_dir={here}", *run.args[2:]]
    run_here(["-m", "pretrain.train", *args], 2, timeout=600)
    curve = losses(run.run_dir)
    assert sorted(curve) == list(range(1, STEPS + 1)) and curve == losses(here)  # bit for bit
    tag = run.run_dir / "checkpoints" / f"step_{STEPS:08d}"
    assert {p.name for p in tag.glob("mp_rank_*")} == {
        "mp_rank_00_model_states.pt",  # stage 0
        "mp_rank_01_model_states.pt",  # stage 1
    }
    print(f"2 nodes x 1 task, PP 2, {STEPS} steps: {seconds:.0f}s")


def test_two_nodes_context_parallel_one_cp_rank_per_node(cluster, wikitext_manifest, base):
    """CP=2 with one context-parallel rank per node (the all-gathers of K, V and twicing's O1
    cross the nodes over gloo) trains exactly the curve the same layout trains on one host."""
    from launch import run as run_here

    extra = ("parallel.tensor=1", "parallel.context=2")
    run = Run(base, wikitext_manifest, "cp2", 1, *extra)
    jid, info, seconds = _run_to_completion(run)
    assert info["JobState"] == "COMPLETED" and info["NumNodes"] == "2", info
    for rank in range(2):
        assert f"{rank}: [rank {rank}/2 node sbx-node{rank + 1} local 0]" in run.rank_log(jid, rank)
    assert "TP 1 × CP 2 (allgather) × DP 1" in run.rank_log(jid, 0)
    here = base / "cp2-one-host"
    args = ["--config", run.args[0], f"run_dir={here}", *run.args[2:]]
    run_here(["-m", "pretrain.train", *args], 2, timeout=600)
    curve = losses(run.run_dir)
    assert sorted(curve) == list(range(1, STEPS + 1)) and curve == losses(here)  # bit for bit
    print(f"2 nodes x 1 task, CP 2, {STEPS} steps: {seconds:.0f}s")


@pytest.mark.parametrize("saves", ["sync", "async"])
def test_preemption_signal_checkpoint_requeue_resumes_the_same_curve(
    cluster, wikitext_manifest, base, tp_and_dp, saves
):
    """A job in partition 'high' preempts ours: Slurm sends USR1 to the batch shell, which
    forwards it; the ranks checkpoint and exit 75, the script requeues, the rerun resumes. With
    ``checkpoint.async_save`` the periodic saves are written in the background and the stop
    waits for them before its own."""
    reference = losses(tp_and_dp[0].run_dir)
    mode = f"checkpoint.async_save={'true' if saves == 'async' else 'false'}"
    run = Run(base, wikitext_manifest, f"preempted-{saves}", 2, mode)
    t0 = time.monotonic()
    # the run waits before step 4 until the preemption's signal arrives, however fast it trains
    jid = run.submit(TWICING_FAULT_HOLD_BEFORE_STEP="4:300")
    wait_for(lambda: run.steps_logged() >= 3, START_S, "3 training steps", jid)
    high = subprocess.run(
        ["sbatch", "--parsable", "--partition=high", "--nodes=2", "--ntasks-per-node=1",
         f"--output={base}/high-%j.out", "--wrap", "srun true"],
        capture_output=True, text=True, timeout=60, env=job_env(run.logs),
    )  # fmt: skip
    assert high.returncode == 0, high.stderr
    info = wait_job(jid, REQUEUE_S + RUN_S, restarts=1, log=base / f"{run.name}-{jid}.out")
    seconds = time.monotonic() - t0

    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", info
    assert job(high.stdout.strip())["JobState"] == "COMPLETED"
    batch = run.batch_log(jid)
    assert "got SIGUSR1" in batch and "checkpoint written; requeueing" in batch
    assert "restart 1:" in batch and "training finished" in batch
    log0 = run.rank_log(jid, 0)
    stopped = int(log0.split("[train] stopping after step ")[1].split()[0])
    assert stopped == 4
    assert f"[train] resumed from step_{stopped:08d}: step {stopped}," in log0
    for rank in range(4):
        log = run.rank_log(jid, rank)
        assert log.count(f"{rank}: [rank {rank}] exit code 75") == 1, log[-2000:]
        assert log.count(f"{rank}: [rank {rank}] exit code 0") == 1
    assert losses(run.run_dir) == reference  # bit for bit, every step
    print(f"preempted at step {stopped}, requeued, resumed, finished: {seconds:.0f}s")


def test_time_limit_signal_checkpoints_requeues_and_resumes(cluster, wikitext_manifest, base):
    """The real --signal=B:USR1@N path: a 2-minute job gets USR1 from Slurm 50-80 s before its
    time limit (never from the test), the ranks checkpoint, the job requeues itself and the
    rerun resumes from that checkpoint. Should the signal come while the ranks are still
    starting (a loaded machine), the script requeues without a new checkpoint, and a later run
    gets its own signal: any number of such requeues is allowed, a TIMEOUT is not."""
    # no periodic checkpoints: the one the rerun resumes from is the one the signal caused
    run = Run(
        base,
        wikitext_manifest,
        "timelimit",
        1,
        "training.train_steps=5000",
        "checkpoint.interval=0",
    )
    t0 = time.monotonic()
    jid = run.submit("--time=2", "--signal=B:USR1@50")
    batch = lambda: run.batch_log(jid)  # noqa: E731
    log0 = lambda: run.rank_log(jid, 0)  # noqa: E731
    wait_for(lambda: "checkpoint written; requeueing" in batch(), 3 * 150, "a checkpoint", jid)
    t_requeue = time.monotonic() - t0
    stopped = int(log0().split("[train] stopping after step ")[1].split()[0])
    resumed = f"[train] resumed from step_{stopped:08d}: step {stopped},"
    wait_for(lambda: resumed in log0(), REQUEUE_S, "the requeued run to resume", jid)
    wait_for(lambda: f"step {stopped + 1}/5000" in log0(), START_S, "a step after resume", jid)
    seconds = time.monotonic() - t0
    subprocess.run(["scancel", jid], check=True, timeout=30)
    info = wait_job(jid, 60)

    assert info["JobState"] == "CANCELLED" and info["TimeLimit"] == "00:02:00", info
    assert int(info["Restarts"]) >= 1
    text = batch()
    # every requeue was caused by a USR1 that Slurm sent, none by Slurm killing the job
    assert text.count("got SIGUSR1") >= text.count("requeueing job") >= 1
    assert "TIME LIMIT" not in text and "TIMEOUT" not in text
    before = log0().split(resumed)[0]
    assert f"[ckpt] saved {run.run_dir}/checkpoints/step_{stopped:08d}" in before
    assert f"[train] stopping after step {stopped} (checkpoint written)" in before
    print(f"time-limit USR1 -> checkpoint + requeue at {t_requeue:.0f}s; resumed at {seconds:.0f}s")


def test_killed_rank_fails_the_job_quickly_and_resubmission_resumes(
    cluster, wikitext_manifest, base, tp_across_nodes
):
    reference = losses(tp_across_nodes[0].run_dir)
    run = Run(base, wikitext_manifest, "killed", 1)
    jid = run.submit()
    wait_for(lambda: _checkpoint_complete(run.run_dir, 10), START_S, "step-10 checkpoint", jid)
    victim = rank_pid(jid, 1)  # rank 1 runs on the second node
    os.kill(victim, signal.SIGKILL)
    t_kill = time.monotonic()
    info = wait_job(jid, 90)
    elapsed = time.monotonic() - t_kill

    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", info
    assert elapsed < 60, f"the job took {elapsed:.0f}s to fail after a rank was killed"
    assert "failed (code" in run.batch_log(jid) and "not requeued" in run.batch_log(jid)
    latest = (run.run_dir / "checkpoints/latest").read_text()
    done = int(latest.split("_")[1])
    assert 10 <= done < STEPS and max(losses(run.run_dir)) < STEPS

    again = run.submit()  # the same command again
    info = wait_job(again, START_S + RUN_S, log=base / f"killed-{again}.out")
    assert info["JobState"] == "COMPLETED", info
    assert f"[train] resumed from {latest}: step {done}," in run.rank_log(again, 0)
    assert losses(run.run_dir) == reference
    print(f"killed rank -> FAILED in {elapsed:.1f}s; resubmission resumed from {latest}")


def test_submit_chains_singleton_links_then_afterok_evaluation(cluster, wikitext_manifest, base):
    """slurm/submit.sh --chain 2 --eval: link 1 stops at step 3 (exit 75, not requeued), link 2
    (--dependency=singleton) resumes and finishes, then eval.sbatch runs (afterok)."""
    wikitext = need_shared("data", "wikitext")
    run = Run(base, wikitext_manifest, "chained", 1, "training.train_steps=6")
    out_json = base / "chained-ppl.json"
    cmd = [
        str(SLURM_DIR / "submit.sh"),
        "--chain", "2",
        "--job-name", "chained",
        "--sbatch", "--nodes=2",
        "--sbatch", "--ntasks-per-node=1",
        "--sbatch", f"--output={base}/%x-%j.out",
        "--eval",
        "--eval-out", str(out_json),
        "--eval-sbatch", f"--output={base}/eval-%j.out",
        "--eval-arg", "--wikitext", "--eval-arg", str(wikitext),
        "--eval-arg", "--max-documents", "--eval-arg", "3",
        *run.args, "training.exit_at_step=3",
    ]  # fmt: skip
    t0 = time.monotonic()
    env = job_env(run.logs, TWICING_REQUEUE="0")
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    roles = [line.split() for line in out.stdout.splitlines()]
    assert [r for r, _ in roles] == ["pretrain", "pretrain", "eval"], out.stdout
    link1, link2, ev = (j for _, j in roles)
    assert job(link2)["Dependency"].startswith("singleton")
    assert job(ev)["Dependency"].startswith(f"afterok:{link2}")
    info = wait_job(ev, 3 * START_S + 2 * RUN_S, log=base / f"eval-{ev}.out")
    seconds = time.monotonic() - t0

    first, second = job(link1), job(link2)
    assert first["JobState"] == "FAILED" and first["ExitCode"] == "75:0", first  # stopped early
    assert second["JobState"] == "COMPLETED" and info["JobState"] == "COMPLETED", (second, info)
    assert second["StartTime"] >= first["EndTime"] and info["StartTime"] >= second["EndTime"]
    assert "not requeued (resubmit to resume)" in run.batch_log(link1)
    assert "[train] resumed from step_00000003: step 3," in run.rank_log(link2, 0)
    assert sorted(losses(run.run_dir)) == [1, 2, 3, 4, 5, 6]
    result = json.loads(out_json.read_text())
    assert result["tokens"] > 0 and 1 < result["token_ppl"] < 1024 and result["word_ppl"] > 1
    assert result["step"] == 6 and Path(result["checkpoint"]).name == "step_00000006"
    table = (base / f"eval-{ev}.out").read_text()
    assert "token ppl" in table and f"results: {out_json}" in table
    print(f"chain of 2 + eval: {seconds:.0f}s, token ppl {result['token_ppl']:.1f}")


def test_failed_pretraining_cancels_the_chained_evaluation(cluster, wikitext_manifest, base):
    # valid on its own (so submit.sh accepts it), impossible on the job's 2 ranks: exit 2
    run = Run(base, wikitext_manifest, "badconfig", 1, "parallel.tensor=4")
    cmd = [
        str(SLURM_DIR / "submit.sh"),
        "--job-name", "badconfig",
        "--sbatch", "--nodes=2",
        "--sbatch", f"--output={base}/%x-%j.out",
        "--eval", "--eval-out", str(base / "never.json"),
        "--eval-sbatch", f"--output={base}/eval-%j.out",
        *run.args,
    ]  # fmt: skip
    out = subprocess.run(
        cmd, cwd=ROOT, env=job_env(run.logs), capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    (_, train_id), (_, eval_id) = (line.split() for line in out.stdout.splitlines())
    info = wait_job(train_id, START_S)
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0", info
    # the first rank to fail exits 2; --kill-on-bad-exit may terminate the other one first
    logs = run.rank_log(train_id, 0) + run.rank_log(train_id, 1)
    assert "config error" in logs and "] exit code 2" in logs, logs[-3000:]
    assert "not requeued" in run.batch_log(train_id)
    ev = wait_job(eval_id, 60)
    assert ev["JobState"] == "CANCELLED" and "Dependency" in ev["Reason"], ev
    assert not (base / "never.json").exists()


def test_shellcheck_clean():
    scripts = [*sorted(SLURM_DIR.glob("*.sbatch")), *sorted(SLURM_DIR.glob("*.sh"))]
    assert len(scripts) >= 3
    if shutil.which("shellcheck") is None:
        if os.environ.get("CI"):
            pytest.fail("shellcheck is not installed (.ci/run installs it)")
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    ci = ROOT / ".ci" / "run"
    files = [*scripts, *([ci] if ci.exists() else [])]
    out = subprocess.run(["shellcheck", *map(str, files)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
