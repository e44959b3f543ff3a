"""Run the real training entry point (``python -m pretrain.train``) as N gloo ranks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from launch import launch, run

#: a tiny GPT that trains in seconds on 2 cores; dropout off unless a test turns it on
TINY = [
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.num_attention_heads=4",
    "model.ffn_hidden_size=128",
    "model.vocab_size=1024",
    "model.seq_length=64",
    "training.micro_batch_size=2",
    "training.global_batch_size=8",
    "training.log_interval=1",
    "training.eval_interval=0",
    "optimizer.lr=3e-3",
    "optimizer.warmup_steps=2",
    "checkpoint.interval=0",
    "training.timeout_minutes=2",
]


def argv(run_dir: Path, manifest: Path, overrides: list[str]) -> list[str]:
    return [
        "-m",
        "pretrain.train",
        f"run_dir={run_dir}",
        f"data.manifest={manifest}",
        *TINY,
        *overrides,
    ]


def train(
    run_dir: Path, manifest: Path, nprocs: int, *overrides: str, env=None, timeout=600, check=True
):
    """Run to completion; returns ``[(returncode, output)]`` per rank."""
    return run(
        argv(run_dir, manifest, list(overrides)), nprocs, timeout=timeout, env=env, check=check
    )


def start(
    run_dir: Path, manifest: Path, nprocs: int, *overrides: str, env=None, fresh=False
) -> list[subprocess.Popen]:
    """Start ranks in the background (for tests that signal or kill them); ``fresh``: as new
    interpreters (see ``launch.launch``)."""
    log_dir = run_dir.parent / f"{run_dir.name}-logs-{time.monotonic_ns()}"
    log_dir.mkdir(parents=True)
    procs = launch(
        argv(run_dir, manifest, list(overrides)), nprocs, env=env, log_dir=log_dir, fresh=fresh
    )
    for p in procs:
        p.log_dir = log_dir  # type: ignore[attr-defined]
    return procs


def output(procs: list[subprocess.Popen], rank: int) -> str:
    return (procs[rank].log_dir / f"rank{rank}.log").read_text()  # type: ignore[attr-defined]


def wait_for(
    predicate, timeout: float, what: str, procs: list[subprocess.Popen] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if procs and any(p.poll() is not None for p in procs):
            outs = "\n".join(output(procs, r)[-3000:] for r in range(len(procs)))
            raise AssertionError(f"a rank exited while waiting for {what}:\n{outs}")
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def signal_all(procs: list[subprocess.Popen], sig: int = signal.SIGKILL) -> None:
    for p in procs:
        if p.poll() is None:
            os.kill(p.pid, sig)


def finish(procs: list[subprocess.Popen], timeout: float = 300) -> list[int]:
    return [p.wait(timeout=timeout) for p in procs]


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def losses(run_dir: Path) -> dict[int, float]:
    """Training loss per step (the last record of a step wins: a killed run may repeat steps)."""
    return {m["step"]: m["loss"] for m in metrics(run_dir) if "loss" in m}


def key_bias_slices(name: str, heads: int, groups: int, hidden: int) -> list[slice]:
    """The key part of a fused QKV bias. Its exact gradient is 0 (softmax ignores a shift of
    all logits), so AdamW turns float noise into ±lr steps there at ANY change of reduction
    order: not comparable between layouts."""
    if not name.endswith("linear_qkv.bias"):
        return []
    d = hidden // heads
    per = (heads // groups + 2) * d
    q = heads // groups * d
    return [slice(g * per + q, g * per + q + d) for g in range(groups)]


def weights_differ(ours: dict, theirs: dict, heads: int, groups: int, hidden: int) -> dict:
    """{name: relative difference} of every weight above 1e-5 (key biases masked)."""
    assert ours.keys() == theirs.keys()
    out = {}
    for name, w in theirs.items():
        a, b = ours[name].clone(), w.clone()
        for s in key_bias_slices(name, heads, groups, hidden):
            a[s] = b[s] = 0
        err = ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
        if err > 1e-5:
            out[name] = err
    return out
