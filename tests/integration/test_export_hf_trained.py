"""A trained run (multi-process) exports to Hugging Face; the export scores the checkpoint's
perplexity."""

from __future__ import annotations

import json

import pytest
from conftest import need_module

from launch import run
from pretrain_runs import train

transformers = need_module("transformers")

EVAL = ["-m", "pretrain.evaluate", "--data", "wikitext-2:valid", "--max-documents", "3"]


TRAINED = [
    "model.attention=softmax",
    "model.normalization=RMSNorm",
    "model.activation=swiglu",
    "model.num_query_groups=2",
    "parallel.tensor=2",
    "parallel.zero_stage=1",
    "training.train_steps=4",
    "checkpoint.interval=4",
]


@pytest.mark.slow
def test_trained_run_exports_and_scores_the_same_perplexity(wikitext_manifest, tmp_path):
    """A run trained at TP=2 → export CLI → offline HF load: tokenizer ids and logits match,
    and ``pretrain.evaluate --hf-model`` reports the checkpoint's perplexity."""
    run_dir = tmp_path / "run"
    train(run_dir, wikitext_manifest, 2, *TRAINED)
    out = tmp_path / "hf"
    ((rc, text),) = run(
        ["-m", "pretrain.export_hf", "--checkpoint", str(run_dir), "--out", str(out)], 1
    )
    assert rc == 0 and "as LlamaForCausalLM" in text and "AutoTokenizer" in text
    assert {p.name for p in out.iterdir()} >= {
        "config.json",
        "model.safetensors",
        "tokenizer.model",
        "tokenizer.json",
        "tokenizer_config.json",
        "twicing_export.json",
    }

    from data_prep.sentencepiece_tokenizer import SentencePieceTokenizer
    from pretrain.evaluation.texts import load_text

    sp = SentencePieceTokenizer(out / "tokenizer.model")
    hf_tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    docs = load_text("wikitext-2:valid").documents
    assert all(hf_tok(d, add_special_tokens=False)["input_ids"] == sp.encode(d) for d in docs)
    assert hf_tok.decode(sp.encode(docs[0])) == sp.decode(sp.encode(docs[0]))
    assert hf_tok.eos_token_id == sp.eod

    common = [*EVAL, "--no-progress", "--no-oversmoothing"]
    a, b = tmp_path / "ckpt.json", tmp_path / "hf.json"
    run([*common, "--checkpoint", str(run_dir), "--out", str(a)], 1)
    run([*common, "--hf-model", str(out), "--out", str(b)], 1)
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    assert rb["hf_model"] == "LlamaForCausalLM" and rb["step"] == ra["step"] == 4
    assert rb["tokens"] == ra["tokens"] > 5000 and rb["words"] == ra["words"]
    rel = abs(rb["token_ppl"] - ra["token_ppl"]) / ra["token_ppl"]
    print(
        f"perplexity: checkpoint {ra['token_ppl']:.6f}, HF export {rb['token_ppl']:.6f}, "
        f"relative difference {rel:.2g}"
    )
    assert rel <= 1e-6
    assert abs(rb["word_ppl"] - ra["word_ppl"]) / ra["word_ppl"] <= 1e-6
