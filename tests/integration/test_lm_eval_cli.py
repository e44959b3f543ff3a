"""The commands end to end, as separate processes: the stock ``lm_eval --model twicing`` (the
install-time hook) and ``python -m pretrain.lm_eval`` give the same results JSON; transformers'
``generate()`` on a custom-code export gives ``python -m pretrain.generate --temperature 0``'s
tokens."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "unit"))
from conftest import need_module  # noqa: E402

lm_eval = need_module("lm_eval")
transformers = need_module("transformers")

from test_export_hf import GPT2, LLAMA, synthetic_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}


def run(argv: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        argv, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_stock_lm_eval_command_knows_twicing(tmp_path, wikitext_manifest, one_rank):
    path = synthetic_checkpoint(tmp_path, wikitext_manifest, "c", attention="twicing", **LLAMA)
    lm_eval_bin = Path(sys.executable).with_name("lm_eval")
    assert lm_eval_bin.is_file(), "the eval extra is not installed (pip install -e '.[eval]')"
    task, limit = "twicing_wikitext_mc", "6"
    stock = run(
        [
            str(lm_eval_bin),
            "--model",
            "twicing",
            "--model_args",
            f"checkpoint={path}",
            "--tasks",
            task,
            "--include_path",
            "configs/lm_eval",
            "--limit",
            limit,
            "--output_path",
            str(tmp_path / "stock"),
        ]
    )
    hint = "(is the hook installed? python -m pretrain.lm_eval --install-plugin)"
    assert stock.returncode == 0, f"{hint}\n{stock.stderr[-3000:]}"
    assert "twicing_wikitext_mc" in stock.stdout
    out = tmp_path / "ours.json"
    ours = run(
        [sys.executable, "-m", "pretrain.lm_eval", "--checkpoint", str(path), "--tasks", task]
        + ["--limit", limit, "--bootstrap-iters", "0", "--out", str(out)]
    )
    assert ours.returncode == 0, ours.stderr[-3000:]
    mine = json.loads(out.read_text())
    (stock_file,) = (tmp_path / "stock").rglob("results_*.json")
    theirs = json.loads(stock_file.read_text())
    for key in ("acc,none", "acc_norm,none"):
        assert mine["results"][task][key] == theirs["results"][task][key]
    assert (mine["config"]["model"], theirs["config"]["model"]) == ("TwicingLM", "twicing")
    assert mine["config"]["attention"] == theirs["config"]["attention"] == "twicing"


def test_hf_generate_matches_pretrain_generate(tmp_path, wikitext_manifest, one_rank):
    """Greedy, cache on in both: HF ``generate()`` on the export of a twicing last-K GQA model
    (learned positions) vs the ``pretrain.generate`` command (its JSONL ``token_ids``)."""
    from pretrain.checkpoint.reader import open_checkpoint
    from pretrain.export.hf_export import export

    path = synthetic_checkpoint(
        tmp_path,
        wikitext_manifest,
        "g",
        attention="twicing",
        attention_layers="last:2",
        num_layers=3,
        num_query_groups=2,
        **GPT2,
    )
    export(open_checkpoint(path), tmp_path / "hf")
    prompts = ["The game 's", "Valkyria Chronicles III is a"]
    out = tmp_path / "gen.jsonl"
    argv = [sys.executable, "-m", "pretrain.generate", "--checkpoint", str(path)]
    for p in prompts:
        argv += ["--prompt", p]
    gen = run([*argv, "--temperature", "0", "--max-new-tokens", "12", "--out", str(out)])
    assert gen.returncode == 0, gen.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", trust_remote_code=True, local_files_only=True
    ).eval()
    eod = open_checkpoint(path).tokenizer.eod
    for r in records:
        with torch.no_grad():
            ids = model.generate(
                torch.tensor([r["prompt_ids"]]), max_new_tokens=12, do_sample=False, use_cache=True
            )[0, len(r["prompt_ids"]) :].tolist()
        ids = ids[: ids.index(eod)] if eod in ids else ids
        assert ids == r["token_ids"] and len(ids) >= 4


def test_tensor_parallel_lm_eval_matches_one_process(tmp_path, wikitext_manifest, one_rank):
    """``pretrain.lm_eval`` under a 2-rank launcher (TP = 2, every rank scoring every request,
    rank 0 writing) gives the one-process log-likelihoods (≤ 1e-4) and metrics."""
    path = synthetic_checkpoint(
        tmp_path, wikitext_manifest, "tp", attention="twicing", num_query_groups=2
    )
    task = "twicing_wikitext_mc"
    common = ["-m", "pretrain.lm_eval", "--checkpoint", str(path), "--tasks", task, "--limit"]
    common += ["6", "--bootstrap-iters", "0", "--log-samples", "--out"]
    launch = [sys.executable, "-m", "pretrain.local_launch", "--nproc", "2"]
    results = {}
    for tp, prefix in ((1, [sys.executable]), (2, launch)):
        out = tmp_path / f"tp{tp}.json"
        done = run([*prefix, *common, str(out)])
        assert done.returncode == 0, done.stderr[-3000:]
        results[tp] = json.loads(out.read_text())
        assert results[tp]["config"]["tensor_parallel"] == tp
    lls = {
        tp: [float(r[0]) for s in res["samples"][task] for r in s["filtered_resps"]]
        for tp, res in results.items()
    }
    assert len(lls[1]) == len(lls[2]) == 24
    assert max(abs(a - b) for a, b in zip(lls[1], lls[2], strict=True)) <= 1e-4
    assert results[1]["results"][task]["acc,none"] == results[2]["results"][task]["acc,none"]
