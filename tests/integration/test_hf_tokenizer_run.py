"""A tiny model trained on WikiText-2 tokenized with a Hugging Face byte-level BPE (trained by
data_prep): evaluation (token and word perplexity with the word counts of the text, bits per
byte), generation (multi-byte characters decode whole), the export's ``AutoTokenizer`` (encodes
as training did) and lm-eval's own ``hf`` model on the export (identical log-likelihoods to our
adapter on the checkpoint)."""

from __future__ import annotations

import json
import math
import os

import pytest
from conftest import need_module, need_shared

from launch import run
from pretrain_runs import train

pytestmark = pytest.mark.slow
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def hf_manifest(tmp_path_factory):
    """WikiText-2 with a 1024-token byte-level BPE trained on its train split."""
    from data_prep.prepare_wikitext import prepare_wikitext
    from data_prep.sources import Corpus
    from data_prep.train_hf_tokenizer import train_hf_bpe
    from data_prep.wikitext import articles, resolve_source

    source = need_shared("data", "wikitext")
    out = tmp_path_factory.mktemp("wt2-hf")
    docs = [a.text for a in articles(resolve_source("wikitext-2", source).rows("train"))]
    tokenizer = train_hf_bpe([Corpus("wt2", documents=lambda: docs, fingerprint="wt2")],
                             out / "tokenizer", 1024, progress=False)  # fmt: skip
    return prepare_wikitext(out, name="wikitext-2", source=source, tokenizer=tokenizer,
                            progress=False)  # fmt: skip


@pytest.fixture(scope="module")
def hf_run(hf_manifest, tmp_path_factory):
    """Softmax (so the export is a stock GPT-2), TP 2, 30 steps."""
    run_dir = tmp_path_factory.mktemp("hf-run") / "run"
    train(run_dir, hf_manifest, 2, "parallel.tensor=2", "model.attention=softmax",
          "model.position_embedding=learned_absolute", "training.train_steps=30",
          "checkpoint.interval=30")  # fmt: skip
    return run_dir


def test_the_run_records_its_hugging_face_tokenizer(hf_run, hf_manifest):
    from data_prep.manifest import load_manifest

    tok = load_manifest(hf_manifest).tokenizer()
    tag = hf_run / "checkpoints/step_00000030"
    state = json.loads((tag / "trainer_state.json").read_text())
    assert state["tokenizer"] == {"file": "tokenizer", "sha256": tok.sha256, "vocab_size": 1024,
                                  "eod": tok.eod}  # fmt: skip
    assert (tag / "tokenizer/tokenizer.json").read_bytes() == (
        tok.model_path / "tokenizer.json"
    ).read_bytes()


def test_evaluate_reports_token_word_and_byte_perplexity(hf_run, tmp_path):
    from pretrain.evaluation.texts import load_text

    wikitext = need_shared("data", "wikitext")
    out = tmp_path / "r.json"
    run(["-m", "pretrain.evaluate", "--checkpoint", str(hf_run), "--data", "wikitext-2:valid",
         "--wikitext", str(wikitext), "--max-documents", "3", "--out", str(out),
         "--no-progress"], 1)  # fmt: skip
    report = json.loads(out.read_text())
    text = load_text("wikitext-2:valid", wikitext_source=str(wikitext), max_documents=3)
    assert report["words"] == text.words and report["data"]["bytes"] == text.bytes
    assert 1 < report["token_ppl"] < 1024 and math.isfinite(report["word_ppl"])
    nll = math.log(report["token_ppl"]) * report["tokens"]
    assert math.isclose(report["bits_per_byte"], nll / math.log(2) / text.bytes, rel_tol=1e-9)
    assert math.isclose(report["word_ppl"], math.exp(nll / text.words), rel_tol=1e-9)


def test_generate_decodes_multibyte_characters_whole(hf_run, tmp_path):
    from pretrain.checkpoint.reader import open_checkpoint

    prompts = ["Le café à Zürich —", "東京 is the capital of"]
    out = tmp_path / "g.jsonl"
    argv = ["-m", "pretrain.generate", "--checkpoint", str(hf_run), "--out", str(out),
            "--max-new-tokens", "24", "--temperature", "1.0", "--seed", "3"]  # fmt: skip
    for p in prompts:
        argv += ["--prompt", p]
    run(argv, 1)
    tok = open_checkpoint(hf_run).tokenizer
    for r, prompt in zip((json.loads(x) for x in out.read_text().splitlines()), prompts,
                         strict=True):  # fmt: skip
        assert tok.decode(r["prompt_ids"][1:]) == prompt  # multi-byte characters round-trip
        assert not r["completion"].endswith("\ufffd"), r  # no character cut at the end
        whole = tok.decode(r["prompt_ids"][1:] + r["token_ids"])
        assert whole.startswith(prompt + r["completion"])


def test_export_autotokenizer_and_lm_eval_peer_check(hf_run, tmp_path, one_rank):
    """``AutoTokenizer`` on the export encodes as the run's tokenizer; lm-eval's ``hf`` model on
    the export and our adapter on the checkpoint give the same log-likelihoods."""
    lm_eval = need_module("lm_eval")
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    from pretrain.checkpoint.reader import open_checkpoint
    from pretrain.evaluation.lm_eval_adapter import TwicingLM
    from pretrain.export.hf_export import export
    from pretrain.lm_eval import TASKS_DIR

    ck = open_checkpoint(hf_run)
    meta = export(ck, tmp_path / "hf")
    assert meta["architecture"] == "GPT2LMHeadModel"
    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    for text in ["plain words", "Le café à Zürich — 東京 🙂", " leading  spaces\n\nand lines"]:
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == ck.tokenizer.encode(text)
    assert hf_tok.eos_token_id == ck.tokenizer.eod
    tasks = TaskManager(include_path=[str(TASKS_DIR)], include_defaults=False)
    ours = TwicingLM(checkpoint=str(hf_run), batch_size=8)
    theirs = HFLM(pretrained=str(tmp_path / "hf"), device="cpu", dtype="float32", batch_size=8,
                  prefix_token_id=ck.tokenizer.eod)  # fmt: skip
    task = "twicing_wikitext_mc"
    results = [
        lm_eval.simple_evaluate(
            model=lm, tasks=[task], limit=8, task_manager=tasks, log_samples=True, bootstrap_iters=0
        )  # fmt: skip
        for lm in (ours, theirs)
    ]
    la, lb = (
        [float(x[0]) for s in r["samples"][task] for x in s["filtered_resps"]] for r in results
    )
    assert len(la) == len(lb) == 32 and max(abs(a - b) for a, b in zip(la, lb, strict=True)) < 1e-4


def test_a_vocabulary_larger_than_the_model_is_refused(hf_manifest, tmp_path):
    """The manifest's 1024-token tokenizer against model.vocab_size=512: exit 2 naming the key,
    the value and the tokenizer, before anything is written into the run directory."""
    from pretrain_runs import argv

    run_dir = tmp_path / "run"
    [(code, out)] = run(argv(run_dir, hf_manifest, ["model.vocab_size=512"]), 1, check=False)
    assert code == 2, out[-2000:]
    assert (
        "config key 'model.vocab_size': 512 is smaller than the tokenizer's vocabulary (1024" in out
    )
    assert str(hf_manifest.parent / "tokenizer") in out and "Traceback" not in out
    assert not (run_dir / "checkpoints").exists()
