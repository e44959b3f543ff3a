"""Hugging Face export: the exported model gives our logits (≤ 1e-5) and our perplexity through
the evaluation entry point, loads offline with ``AutoModelForCausalLM``/``AutoTokenizer``, and
the stock architectures refuse twicing (or otherwise non-standard) models."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import need_module

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
transformers = need_module("transformers")

#: the tiny GPT, with a padded vocabulary (1024 pieces → 1100 rows)
BASE = dict(
    num_layers=2,
    hidden_size=64,
    num_attention_heads=4,
    ffn_hidden_size=128,
    vocab_size=1024,
    vocab_pad_multiple=100,
    seq_length=64,
    attention="softmax",
)
LLAMA = dict(position_embedding="rope", normalization="RMSNorm", activation="swiglu")
GPT2 = dict(position_embedding="learned_absolute", normalization="LayerNorm")

VARIANTS = {
    "llama": {**LLAMA, "add_bias_linear": False, "tied_embeddings": False},
    "llama-gqa-bias-tied": {**LLAMA, "num_query_groups": 2, "rotary_base": 500},
    "llama-mqa-eps": {**LLAMA, "num_query_groups": 1, "layernorm_epsilon": 1e-6},
    "gpt2-gelu": {**GPT2, "activation": "gelu"},
    "gpt2-relu-untied": {**GPT2, "activation": "relu", "tied_embeddings": False},
    "gpt2-nobias-gqa": {
        **GPT2,
        "activation": "gelu",
        "add_bias_linear": False,
        "num_query_groups": 2,
    },
}


def tokenizer_model(manifest: Path) -> Path:
    return (manifest.parent / json.loads(manifest.read_text())["tokenizer"]["model"]).resolve()


def synthetic_checkpoint(tmp_path: Path, manifest: Path, name: str, **overrides) -> Path:
    """A consolidated file of a randomly perturbed model (norms, biases, all weights ≠ init)."""
    from data_prep.base.strict_config import to_dict
    from data_prep.sentencepiece_tokenizer import SentencePieceTokenizer
    from model import ModelConfig, build_gpt
    from model.tp_layout import layout_of
    from pretrain.checkpoint.reader import Checkpoint
    from pretrain.checkpoint.state import TrainerState
    from pretrain.consolidate import consolidate

    cfg = ModelConfig(**{**BASE, **overrides})
    torch.manual_seed(0)
    model = build_gpt(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    weights = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    tok = SentencePieceTokenizer(tokenizer_model(manifest))
    state = TrainerState.from_json(
        {
            "step": 0,
            "consumed_samples": 0,
            "config": {"model": to_dict(cfg)},
            "topology": {"tensor": 1, "data": 1, "zero_stage": 1},
            "tp_layout": {k: v.to_json() for k, v in layout_of(model).items()},
            "tokenizer": {
                "file": "tokenizer.model",
                "sha256": tok.sha256,
                "vocab_size": tok.vocab_size,
                "eod": tok.eod,
            },
        },
        "synthetic checkpoint",
    )
    ck = Checkpoint(tmp_path / name, state, cfg, tok, weights)
    return consolidate(ck, tmp_path / f"{name}.pt")


def our_logits(ck, x: torch.Tensor) -> torch.Tensor:
    from pretrain.checkpoint.load_model import load_model

    model = load_model(ck, 0, 1)
    with torch.no_grad():
        return model(x, torch.arange(x.shape[1]).expand_as(x), None)


def hf_logits(out: Path, x: torch.Tensor):
    model = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    with torch.no_grad():
        return model(input_ids=x).logits, model


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_exported_model_gives_our_logits(variant, wikitext_manifest, tmp_path, one_rank):
    from pretrain.checkpoint.reader import open_checkpoint
    from pretrain.export.hf_export import export

    path = synthetic_checkpoint(tmp_path, wikitext_manifest, variant, **VARIANTS[variant])
    ck = open_checkpoint(path)
    meta = export(ck, tmp_path / "hf")
    x = torch.randint(0, 1024, (3, 64), generator=torch.Generator().manual_seed(2))
    ours = our_logits(ck, x)
    theirs, model = hf_logits(tmp_path / "hf", x)
    expected = "LlamaForCausalLM" if variant.startswith("llama") else "GPT2LMHeadModel"
    assert type(model).__name__ == meta["architecture"] == expected
    assert theirs.shape == ours.shape == (3, 64, 1100)  # the padded vocabulary is kept
    diff = (theirs - ours).abs().max().item()
    print(f"{variant}: max |logit diff| {diff:.3g}")
    assert diff <= 1e-5 and ours.abs().max() > 0.5
    tied = VARIANTS[variant].get("tied_embeddings", True)
    emb = model.get_input_embeddings().weight
    assert (model.get_output_embeddings().weight.data_ptr() == emb.data_ptr()) == tied


def test_bf16_export(wikitext_manifest, tmp_path, one_rank):
    from pretrain.checkpoint.reader import open_checkpoint
    from pretrain.export.hf_export import export

    path = synthetic_checkpoint(tmp_path, wikitext_manifest, "bf16", **VARIANTS["llama"])
    export(open_checkpoint(path), tmp_path / "hf", dtype="bf16")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert model.dtype == torch.bfloat16
    assert json.loads((tmp_path / "hf/config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize(
    ("overrides", "arch", "message"),
    [
        ({**LLAMA, "attention": "twicing"}, "llama", "layers [0, 1] use twicing attention"),
        (
            {**GPT2, "attention": "twicing", "attention_layers": "last:1"},
            "gpt2",
            "layers [1] use twicing",
        ),
        ({"position_embedding": "rope", "normalization": "LayerNorm"}, "llama", "no standard"),
        ({**LLAMA, "activation": "gelu"}, "gpt2", "no standard transformers architecture matches"),
        ({**LLAMA}, "gpt2", "--arch gpt2 does not fit this model (it matches llama)"),
    ],
)
def test_stock_architectures_refuse_what_they_cannot_compute(
    overrides, arch, message, wikitext_manifest, tmp_path, capsys, one_rank
):
    """``--arch llama|gpt2`` refuses non-standard models (``auto`` exports them as custom code,
    tests/unit/test_export_remote_code.py) with the reason and the way out."""
    from pretrain.export_hf import main

    path = synthetic_checkpoint(tmp_path, wikitext_manifest, "x", **overrides)
    argv = ["--checkpoint", str(path), "--out", str(tmp_path / "hf"), "--arch", arch]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    if "twicing" in message:
        assert "no standard transformers architecture computes it" in err
        assert "trust_remote_code=True" in err
    assert not (tmp_path / "hf").exists()


# ------------------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_gpt2_export_scores_the_same_nll(wikitext_manifest, tmp_path, one_rank):
    """GPT-2 style: the evaluation's scoring of the export (``hf_token_nll``, as ``--hf-model``
    runs it) equals the megatron model's on the same windows."""
    from pretrain.checkpoint.load_model import load_model
    from pretrain.checkpoint.reader import open_checkpoint
    from pretrain.evaluation.driver import evaluate_text
    from pretrain.evaluation.hf_scorer import hf_token_nll
    from pretrain.evaluation.texts import load_text
    from pretrain.export.hf_export import export

    path = synthetic_checkpoint(tmp_path, wikitext_manifest, "g", **VARIANTS["gpt2-nobias-gqa"])
    ck = open_checkpoint(path)
    export(ck, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    text = load_text("wikitext-2:valid", max_documents=2)
    kw = dict(length=64, stride=32, batch_size=4)
    ours = evaluate_text(load_model(ck, 0, 1), ck.tokenizer, text, **kw)
    theirs = evaluate_text(hf, ck.tokenizer, text, token_nll_fn=hf_token_nll(hf), **kw)
    assert ours["tokens"] == theirs["tokens"]
    assert abs(ours["nll_sum"] - theirs["nll_sum"]) / ours["nll_sum"] <= 1e-6
