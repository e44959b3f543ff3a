"""``benchmarks/reproduce_wikitext.py`` (the README's CPU study) end to end at a tiny size: two
variants, one seed, a few steps, a few evaluation documents. It broke once without a test
noticing (it wrote its evaluation inside the run directory, which the output guard refuses)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

from conftest import need_shared

from launch import ROOT

TINY = [
    "model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=2",
    "model.ffn_hidden_size=64", "model.vocab_size=512", "model.seq_length=32",
    "training.micro_batch_size=4", "training.global_batch_size=4",
    "optimizer.warmup_steps=1",
]  # fmt: skip


def test_the_study_runs_end_to_end_and_reuses_finished_runs(tmp_path):
    wikitext = need_shared("data", "wikitext")
    work, results = tmp_path / "work", tmp_path / "results"
    cmd = [
        sys.executable, "benchmarks/reproduce_wikitext.py", "--seeds", "1", "--steps", "3",
        "--variants", "softmax", "twicing (all)", "--work", str(work), "--results", str(results),
        "--eval-data", "wikitext-2:valid", "--max-documents", "3", "--wikitext", str(wikitext),
        *(f"--set={o}" for o in TINY),
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    rows = json.loads((results / "wikitext_cpu_study.json").read_text())
    assert [(r["variant"], r["seed"]) for r in rows] == [("softmax", 1), ("twicing (all)", 1)]
    for row, slug in zip(rows, ("softmax", "twicing__all"), strict=True):
        report = json.loads((work / slug / "seed1/eval/wikitext_2_valid.json").read_text())
        assert row["token_ppl"] == report["token_ppl"] and row["word_ppl"] == report["word_ppl"]
        assert 1 < row["token_ppl"] < 512 and math.isfinite(row["word_ppl"])
        assert report["data"]["documents"] == 3 and report["step"] == 3
        assert len(row["oversmoothing"]) == 3  # embeddings + 2 layers
    table = (results / "wikitext_cpu_study.md").read_text()
    for row in rows:
        assert f"| {row['variant']} | {row['token_ppl']:.2f} | {row['word_ppl']:.2f} |" in table
    assert (results / "wikitext_cpu_study.png").stat().st_size > 0

    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((results / "wikitext_cpu_study.json").read_text()) == rows  # reused
