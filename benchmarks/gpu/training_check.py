"""Training and evaluation through the entry points a user runs, on synthetic tokens.

Every run is ``python -m pretrain.train --config configs/<preset>.yaml key=value ...`` in a
subprocess (world size 1: NCCL on a GPU, gloo on the CPU), and the evaluation is
``python -m pretrain.evaluate --checkpoint RUN ...``; numbers come from what those commands
print and write (log lines, ``metrics.jsonl``, the evaluation JSON). The data is made here with
data_prep: a small sentencepiece tokenizer trained on random words, uniform random token ids as
one indexed dataset, and a manifest.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pretrain.parallel.launch_env import free_port

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER_VOCAB = 512
#: dense bf16 peak of an H100/H200 (datasheet), for MFU
PEAK_TFLOPS = 989.0

_STEP = re.compile(
    r"\[train\] step (?P<step>\d+)/\d+ loss (?P<loss>\S+) .*? (?P<tps>[\d,]+) tok/s "
    r"(?P<tflops>[\d.]+) TFLOP/s/rank(?: MFU [\d.]+%)? mem (?P<mem>[\d.]+) GiB"
)


@dataclass(frozen=True)
class Shape:
    """One model shape: a preset plus overrides (the dry run shrinks it)."""

    name: str
    preset: str
    overrides: tuple[str, ...]
    tokens_per_step: int


@dataclass
class Plan:
    dry_run: bool
    work: Path
    log: Path
    deadline: float
    env: dict[str, str] = field(default_factory=dict)
    shapes: tuple[Shape, ...] = ()
    common: tuple[str, ...] = ()
    ckpt_dir: Path | None = None


VARIANTS = (
    ("softmax", ("model.attention=softmax", "model.attention_layers=all")),
    ("twicing all", ("model.attention=twicing", "model.attention_layers=all")),
    ("twicing last-2", ("model.attention=twicing", "model.attention_layers=last:2")),
)

_TINY = (
    "model.num_layers=4",
    "model.hidden_size=64",
    "model.num_attention_heads=4",
    "model.ffn_hidden_size=128",
    "model.vocab_size=1024",
    "model.seq_length=64",
    "training.micro_batch_size=2",
    "training.global_batch_size=2",
)


def make_plan(dry_run: bool, work: Path, log: Path, deadline: float) -> Plan:
    """The runs: GPT-2-124M and a 1.3B shape on one GPU (bf16, ZeRO-1), or both shrunk on CPU."""
    work.mkdir(parents=True, exist_ok=True)
    if dry_run:
        shapes = (
            Shape("gpt2-124m", "gpt2_124m", _TINY, 2 * 64),
            Shape(
                "1.3b",
                "gpt_1p3b",
                (
                    *_TINY,
                    "model.num_query_groups=2",
                    "parallel.sequence_parallel=false",
                    "parallel.tensor=1",
                    "parallel.pipeline=1",
                ),
                2 * 64,
            ),
        )
        precision = "fp32"
    else:
        shapes = (
            Shape(
                "gpt2-124m",
                "gpt2_124m",
                ("training.micro_batch_size=16", "training.global_batch_size=16"),
                16 * 1024,
            ),
            Shape(
                "1.3b",
                "gpt_1p3b",
                (
                    "parallel.tensor=1",
                    "parallel.pipeline=1",
                    "parallel.sequence_parallel=false",
                    "training.micro_batch_size=8",
                    "training.global_batch_size=8",
                ),
                8 * 2048,
            ),
        )
        precision = "bf16"
    common = (
        "parallel.zero_stage=1",
        f"parallel.precision={precision}",
        "training.log_interval=1",
        "training.eval_interval=0",
        "training.timeout_minutes=5",
        "optimizer.warmup_steps=5",
        "checkpoint.interval=0",
        "checkpoint.keep_last=1",
        "logging.tensorboard=false",
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_DATASETS_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    if dry_run:
        env["DS_ACCELERATOR"] = "cpu"
    # checkpoints of the throughput runs go to memory where there is room (a 1.3B ZeRO-1
    # checkpoint is ~18 GB; the run's save at its end cannot be turned off)
    shm = Path("/dev/shm")
    ckpt = None
    if not dry_run and shm.is_dir() and shutil.disk_usage(shm).free > 40 * 2**30:
        ckpt = shm / "twicing-gpu-check"
    return Plan(dry_run, work, log, deadline, env, shapes, common, ckpt)


# ----------------------------------------------------------------------------- data
def _words(rng: random.Random, n: int) -> str:
    letters = "abcdefghijklmnop"
    return " ".join(
        "".join(rng.choice(letters) for _ in range(rng.randint(2, 7))) for _ in range(n)
    )


def make_data(plan: Plan, tokens: int, seed: int) -> tuple[Path, Path]:
    """(manifest, evaluation text): random-word text, a BPE tokenizer trained on it, uniform
    random ids in the tokenizer's range as the training corpus."""
    from data_prep.indexed import optimal_dtype, write_dataset

    data = plan.work / "data"
    if data.exists():
        shutil.rmtree(data)
    data.mkdir(parents=True)
    rng = random.Random(seed)
    text = data / "words.txt"
    text.write_text("\n".join(_words(rng, 16) for _ in range(3000)) + "\n")
    evaluation = data / "eval.txt"
    evaluation.write_text("\n".join(_words(rng, 16) for _ in range(600)) + "\n")
    _run_checked(
        [
            sys.executable,
            "-m",
            "data_prep",
            "train-tokenizer",
            "--corpus",
            f"words={text}",
            "--text-unit",
            "line",
            "--out",
            str(data / "tok"),
            "--vocab-size",
            str(TOKENIZER_VOCAB),
            "--no-progress",
        ],
        plan,
    )
    ids = np.random.default_rng(seed).integers(3, TOKENIZER_VOCAB, tokens, dtype=np.int64)
    doc = 4096
    docs = np.full(tokens // doc, doc, dtype=np.int64)
    prefix = data / "synthetic_text_document"
    write_dataset(prefix, ids[: int(docs.sum())], docs, optimal_dtype(TOKENIZER_VOCAB))
    manifest = data / "manifest.json"
    _run_checked(
        [
            sys.executable,
            "-m",
            "data_prep",
            "blend",
            "--tokenizer",
            str(data / "tok.model"),
            "--out",
            str(manifest),
            "--train",
            str(prefix),
        ],
        plan,
    )
    return manifest, evaluation


# ----------------------------------------------------------------------------- running
def _append_log(plan: Plan, title: str, text: str) -> None:
    with open(plan.log, "a") as f:
        f.write(f"\n===== {title}\n{text}")


def _run_checked(cmd: list[str], plan: Plan) -> str:
    proc = subprocess.run(cmd, cwd=ROOT, env=plan.env, capture_output=True, text=True, timeout=300)
    _append_log(plan, " ".join(cmd), proc.stdout + proc.stderr)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[:4])} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return proc.stdout


@dataclass
class Result:
    code: int | None
    output: str
    seconds: float

    def tail(self, n: int = 1500) -> str:
        return self.output[-n:]


def run_command(plan: Plan, title: str, args: list[str], cap: float = 300) -> Result:
    """``python ARGS`` at the repository root, with the time left (at most ``cap``); a timed-out
    run returns ``code=None``."""
    left = plan.deadline - time.monotonic()
    if left < 20:
        return Result(None, "skipped: time budget spent", 0.0)
    env = {**plan.env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    cmd = [sys.executable, *args]
    t0 = time.monotonic()
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=min(cap, left)
        )
        code, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        code, out = None, out + f"\ntimed out after {min(cap, left):.0f}s"
    seconds = time.monotonic() - t0
    _append_log(plan, f"{title} ({seconds:.0f}s, exit {code}): {' '.join(cmd)}", out)
    return Result(code, out, seconds)


def train_args(plan: Plan, shape: Shape, run_dir: Path, manifest: Path, *extra: str):
    return [
        "-m",
        "pretrain.train",
        "--config",
        f"configs/{shape.preset}.yaml",
        f"run_dir={run_dir}",
        f"data.manifest={manifest}",
        *shape.overrides,
        *plan.common,
        *extra,
    ]


def parse_steps(output: str) -> list[dict]:
    """The trainer's per-step log lines as numbers."""
    steps = []
    for m in _STEP.finditer(output):
        steps.append(
            {
                "step": int(m["step"]),
                "loss": float(m["loss"]),
                "tokens_per_s": float(m["tps"].replace(",", "")),
                "tflops": float(m["tflops"]),
                "mem_gib": float(m["mem"]),
            }
        )
    return steps


def throughput(plan: Plan, manifest: Path, ceiling: float | None, steps: int = 30) -> list[dict]:
    """30-step runs per shape and variant: tokens/s, TFLOP/s, MFU vs 989 and vs ``ceiling``
    (median over steps 11-30, after warm-up), peak memory."""
    rows = []
    for shape in plan.shapes:
        for variant, overrides in VARIANTS:
            row = {
                "section": "training",
                "id": f"training/{shape.name}/{variant}",
                "shape": shape.name,
                "variant": variant,
            }
            run_dir = plan.work / f"train-{shape.name}-{variant.replace(' ', '-')}"
            shutil.rmtree(run_dir, ignore_errors=True)
            extra = [f"training.train_steps={steps}", *overrides]
            if plan.ckpt_dir is not None:
                extra.append(f"checkpoint.dir={plan.ckpt_dir / run_dir.name}")
            result = run_command(
                plan, row["id"], train_args(plan, shape, run_dir, manifest, *extra), cap=240
            )
            if plan.ckpt_dir is not None:
                shutil.rmtree(plan.ckpt_dir / run_dir.name, ignore_errors=True)
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
            parsed = parse_steps(result.output)
            if len(parsed) < steps:
                status = "SKIP" if result.code is None and not result.seconds else "FAIL"
                rows.append({**row, "status": status, "note": result.tail(600)})
                continue
            # all steps ran: keep the numbers even if the run failed afterwards (its final save)
            timed = [s for s in parsed if s["step"] > steps // 3] or parsed
            tflops = statistics.median(s["tflops"] for s in timed)
            rows.append(
                {
                    **row,
                    "tokens_per_s": statistics.median(s["tokens_per_s"] for s in timed),
                    "tflops": tflops,
                    "mfu_989": tflops / PEAK_TFLOPS,
                    "mfu_ceiling": tflops / ceiling if ceiling else None,
                    "peak_gib": max(s["mem_gib"] for s in parsed),
                    "final_loss": parsed[-1]["loss"],
                    "seconds": result.seconds,
                    "status": "OK"
                    if result.code == 0 and math.isfinite(parsed[-1]["loss"])
                    else "FAIL",
                    "note": "" if result.code == 0 else f"exit {result.code}: {result.tail(400)}",
                }
            )
    return rows


def _metrics(run_dir: Path) -> dict[int, dict]:
    """The last record of each step in ``metrics.jsonl`` (a resumed run repeats none)."""
    path = run_dir / "metrics.jsonl"
    records: dict[int, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            r = json.loads(line)
            if "loss" in r:
                records[r["step"]] = r
    return records


def checkpoint_and_entry_points(plan: Plan, manifest: Path, evaluation: Path) -> list[dict]:
    """Save at step 10 (a stop, exit 75), resume with the same command, compare steps 11-20
    with an uninterrupted run (bit for bit); then ``pretrain.evaluate`` on the result."""
    shape = plan.shapes[0]
    base = ["training.train_steps=20"]
    a_dir, b_dir = plan.work / "ckpt-uninterrupted", plan.work / "ckpt-resumed"
    for d in (a_dir, b_dir):
        shutil.rmtree(d, ignore_errors=True)
    rows = []
    a = run_command(
        plan, "checkpoint/uninterrupted", train_args(plan, shape, a_dir, manifest, *base)
    )
    stop = [*base, "training.exit_at_step=10"]
    b1 = run_command(plan, "checkpoint/stop at 10", train_args(plan, shape, b_dir, manifest, *stop))
    b2 = run_command(plan, "checkpoint/resume", train_args(plan, shape, b_dir, manifest, *stop))
    entry = {
        "section": "entry",
        "id": "entry/train",
        "command": f"python -m pretrain.train --config configs/{shape.preset}.yaml key=value …",
    }
    codes = (a.code, b1.code, b2.code)
    ok_codes = codes == (0, 75, 0)
    rows.append(
        {
            **entry,
            "detail": f"exit codes {codes} (expected (0, 75, 0): finished, stopped with a "
            "checkpoint, resumed and finished)",
            "status": "PASS" if ok_codes else ("SKIP" if None in codes else "FAIL"),
            "note": "" if ok_codes else next(r.tail(800) for r in (a, b1, b2) if r.code != 0),
        }
    )
    ref, got = _metrics(a_dir), _metrics(b_dir)
    row = {"section": "checkpoint", "id": "checkpoint/resume_bitwise", "what": "steps 11-20"}
    steps = range(11, 21)
    if not ok_codes or any(s not in ref or s not in got for s in steps):
        rows.append({**row, "status": "SKIP" if None in codes else "FAIL", "detail": "runs failed"})
    else:
        keys = ("loss", "grad_norm")
        diff = [s for s in steps if any(ref[s].get(k) != got[s].get(k) for k in keys)]
        worst = max(abs(ref[s]["loss"] - got[s]["loss"]) for s in steps)
        detail = (
            "bit-identical loss and grad norm at every step"
            if not diff
            else f"differs from step {diff[0]} (max |Δloss| {worst:.3g}); step 11 "
            + ("identical" if 11 not in diff else "differs")
        )
        status = "PASS" if not diff else "FAIL"
        if diff and 11 not in diff:
            # the resumed state was exact (step 11 matches); is a second uninterrupted run
            # identical to the first, or are the GPU kernels themselves non-deterministic?
            c_dir = plan.work / "ckpt-uninterrupted-again"
            shutil.rmtree(c_dir, ignore_errors=True)
            c = run_command(
                plan, "checkpoint/control", train_args(plan, shape, c_dir, manifest, *base)
            )
            again = _metrics(c_dir)
            if c.code == 0 and all(s in again for s in steps):
                same = all(ref[s]["loss"] == again[s]["loss"] for s in steps)
                detail += (
                    "; a second uninterrupted run is identical to the first, so the resume "
                    "is not exact"
                    if same
                    else "; a second uninterrupted run also differs from the first: the "
                    "kernels are run-to-run non-deterministic, not the checkpoint"
                )
        rows.append({**row, "status": status, "detail": detail, "max_abs_dloss": worst})
    # the evaluation entry point on the finished run
    eval_json = plan.work / "eval.json"
    eval_args = [
        "-m",
        "pretrain.evaluate",
        "--checkpoint",
        str(a_dir),
        "--data",
        f"synthetic={evaluation}",
        "--no-oversmoothing",
        "--no-progress",
        "--batch-size",
        "4",
        "--out",
        str(eval_json),
    ]
    e = run_command(plan, "entry/evaluate", eval_args) if a.code == 0 else Result(None, "", 0.0)
    report = json.loads(eval_json.read_text()) if e.code == 0 and eval_json.exists() else {}
    ppl = _find_number(report, "token_ppl")
    rows.append(
        {
            "section": "entry",
            "id": "entry/evaluate",
            "command": "python -m pretrain.evaluate --checkpoint RUN --data synthetic=FILE",
            "detail": f"exit {e.code}, token perplexity {ppl}",
            "status": "PASS"
            if e.code == 0 and ppl is not None and math.isfinite(ppl)
            else ("SKIP" if e.code is None else "FAIL"),
            "note": "" if e.code == 0 else e.tail(800),
        }
    )
    for d in (a_dir, b_dir):
        shutil.rmtree(d / "checkpoints", ignore_errors=True)
    return rows


def _find_number(obj, key: str) -> float | None:
    """The first number stored under ``key`` anywhere in a JSON object."""
    if isinstance(obj, dict):
        if isinstance(obj.get(key), int | float):
            return float(obj[key])
        obj = list(obj.values())
    if isinstance(obj, list):
        for item in obj:
            found = _find_number(item, key)
            if found is not None:
                return found
    return None


def profile(plan: Plan, shape: Shape, variant: str = "twicing all") -> list[dict]:
    """``profile_check.py`` on ``shape``: device time per step by kernel category."""
    overrides = dict(VARIANTS)[variant]
    out = plan.work / "profile.json"
    out.unlink(missing_ok=True)
    args = [
        "benchmarks/gpu/profile_check.py", "--config", f"configs/{shape.preset}.yaml",
        "--out", str(out), f"run_dir={plan.work / 'profile-run'}",
        *shape.overrides, *plan.common, *overrides,
    ]  # fmt: skip
    result = run_command(plan, f"profile/{shape.name}/{variant}", args, cap=180)
    base = {"section": "profile", "shape": shape.name, "variant": variant}
    if result.code != 0 or not out.exists():
        status = "SKIP" if result.code is None else "FAIL"
        return [{**base, "id": "profile/step", "what": "step", "status": status,
                 "note": result.tail(600)}]  # fmt: skip
    report = json.loads(out.read_text())
    step = report["step_seconds"]
    rows = [
        {
            **base,
            "id": "profile/step",
            "what": "step (wall)",
            "ms": step * 1e3,
            "share": report["busy_seconds"] / step,
            "status": "OK",
            "note": "share = device-busy time / wall time",
        }
    ]
    for name, seconds in report["categories"].items():
        rows.append(
            {**base, "id": f"profile/{name}", "what": name, "ms": seconds * 1e3,
             "share": seconds / step, "status": "OK"}
        )  # fmt: skip
    top = report["top_kernels"][:5]
    rows[0]["note"] += "; top: " + ", ".join(f"{k['name'][:40]} {k['seconds'] * 1e3:.1f} ms"
                                              for k in top)  # fmt: skip
    return rows
