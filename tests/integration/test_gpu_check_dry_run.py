"""``benchmarks/gpu/check.py --dry-run``: the GPU check's code at tiny sizes on the CPU prints
every row of its tables, and the rows it can run here pass."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from model.attention.registry import BACKENDS

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
CONCRETE = [b for b in BACKENDS if b != "auto"]
SEQS, DIMS = ("1k", "4k", "8k"), (64, 128)
VARIANTS = ("softmax", "twicing all", "twicing last-2")


def expected_ids() -> set[str]:
    ids = {
        f"correctness/{b}/{v}/{h}"
        for b in BACKENDS
        for v in ("softmax", "twicing")
        for h in ("mha", "gqa")
    }
    ids |= {f"speed/{b}/{s}/d{d}" for b in CONCRETE for s in SEQS for d in DIMS}
    ids |= {f"auto/{s}/d{d}" for s in SEQS for d in DIMS}
    ids |= {f"training/{shape}/{v}" for shape in ("gpt2-124m", "1.3b") for v in VARIANTS}
    ids |= {"checkpoint/resume_bitwise", "entry/train", "entry/evaluate", "profile/step"}
    ids |= {"profile/matmul", "profile/attention"}
    ids |= {"env/matmul_ceiling", "env/wall", "env/seed", "env/torch", "env/deepspeed"}
    return ids


def test_dry_run_prints_every_row_and_passes(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "benchmarks/gpu/check.py", "--dry-run", "--out", str(out)]
    cmd += ["--work", str(tmp_path / "work")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    report = json.loads((out / "gpu_check.json").read_text())
    rows = {r["id"]: r for r in report["rows"]}
    missing = expected_ids() - set(rows)
    assert not missing, sorted(missing)
    assert not [i for i, r in rows.items() if r["status"] == "FAIL"]

    for i, r in rows.items():
        if i.startswith("correctness/"):
            ran = i.split("/")[1] in ("sdpa", "auto")
            assert r["status"] == ("PASS" if ran else "SKIP"), r
            if ran:
                assert 0 <= r["out_err"] < 0.02 and 0 <= r["grad_err"] < 0.03, r
        if i.startswith("speed/sdpa/"):
            assert r["status"] == "OK" and r["twicing_ms"] > 0 and r["softmax_ms"] > 0, r
        if i.startswith("training/"):
            assert r["status"] == "OK" and r["tokens_per_s"] > 0 and r["peak_gib"] > 0, r
    assert rows["checkpoint/resume_bitwise"]["status"] == "PASS"
    assert rows["entry/train"]["status"] == rows["entry/evaluate"]["status"] == "PASS"

    # the tables are printed last: every section's table, one line per row, then the verdict
    text = (out / "gpu_check.md").read_text()
    assert proc.stdout.rstrip().endswith(text.rstrip())
    assert text.rstrip().endswith("**0 failed row(s)**")
    table_lines = [line for line in text.splitlines() if line.startswith("| ")]
    headers = text.count("\n### ")
    assert len(table_lines) == len(report["rows"]) + headers
