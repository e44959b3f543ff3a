"""Hugging Face export of every attention variant as custom modeling code: the export loads with
``trust_remote_code=True`` offline, gives our logits (≤ 1e-5) and, through transformers' own
``generate()`` with its cache on, the greedy tokens of our incremental decoder (the one behind
``pretrain.generate``); the cache really holds O1 / layer 0's values; bad input is refused."""

from __future__ import annotations

import ast
import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
from conftest import need_module  # noqa: E402

transformers = need_module("transformers")

from test_export_hf import GPT2, LLAMA, synthetic_checkpoint  # noqa: E402

#: every variant; GQA, learned positions, no biases, untied embeddings spread over them
CASES = {
    "twicing-all-gqa": dict(attention="twicing", num_query_groups=2, **LLAMA),
    "twicing-last1": dict(attention="twicing", attention_layers="last:1", **GPT2),
    "neutreno-gqa": dict(
        attention="neutreno", num_query_groups=2, attention_options={"lambda": 0.7}
    ),
    "resformer": dict(
        attention="resformer", attention_options={"lambda_first": 0.3, "lambda_own": 0.9}, **LLAMA
    ),
    "svformer-gqa": dict(attention="svformer", num_query_groups=1, tied_embeddings=False),
    "neural-gqa": dict(
        attention="neural", num_query_groups=2, attention_options={"dim": 4}, add_bias_linear=False
    ),
    "softmax-rope-layernorm": dict(attention="softmax", position_embedding="rope"),
}
BASE = dict(num_layers=3)


def load_remote(path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, trust_remote_code=True, local_files_only=True
    ).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, wikitext_manifest, one_rank):
    """name -> (opened checkpoint, export dir), every case exported once."""
    from pretrain.checkpoint.reader import open_checkpoint
    from pretrain.export.hf_export import export

    root = tmp_path_factory.mktemp("remote")
    out = {}
    for name, overrides in CASES.items():
        path = synthetic_checkpoint(root, wikitext_manifest, name, **{**BASE, **overrides})
        ck = open_checkpoint(path)
        meta = export(ck, root / f"hf-{name}")
        assert meta["architecture"] == "TwicingForCausalLM" and meta["trust_remote_code"]
        out[name] = (ck, root / f"hf-{name}")
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_remote_code_export_gives_our_logits(name, exported):
    from pretrain.checkpoint.load_model import load_model

    ck, hf_dir = exported[name]
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_twicing.TwicingForCausalLM"
    assert config["layer_variants"] == [ck.model.variant_of_layer(i) for i in range(3)]
    assert config["attention_options"] == {
        **ck.model.attention_options,
        **({"dim": 4.0} if ck.model.attention == "neural" else {}),
    }
    assert config["num_key_value_heads"] == ck.model.query_groups
    x = torch.randint(0, 1024, (2, 64), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = load_model(ck, 0, 1)(x, torch.arange(64).expand_as(x), None)
        model = load_remote(hf_dir)
        theirs = model(input_ids=x, use_cache=False).logits
    assert type(model).__name__ == "TwicingForCausalLM"
    assert "transformers_modules" in type(model).__module__  # loaded from the export's code
    diff = (theirs - ours).abs().max().item()
    print(f"{name}: max |logit diff| {diff:.3g} (|logits| max {ours.abs().max():.3g})")
    assert theirs.shape == ours.shape == (2, 64, 1100)
    assert diff <= 1e-5 and ours.abs().max() > 0.5


@pytest.mark.parametrize("name", [n for n in CASES if not n.startswith("softmax")])
def test_hf_generate_with_cache_gives_our_greedy_tokens(name, exported):
    """transformers' ``generate()`` (DynamicCache on) vs our cached decoder, greedy, two prompts
    decoded as one left-padded batch on both sides."""
    from model.inference.generation import generate
    from pretrain.checkpoint.load_model import load_model

    ck, hf_dir = exported[name]
    eod = ck.tokenizer.eod
    prompts = [[eod, *ck.tokenizer.encode(t)] for t in ("The game began", "In 1990 , the")]
    ours = generate(
        load_model(ck, 0, 1),
        prompts,
        max_new_tokens=12,
        eod=eod,
        vocab_size=ck.tokenizer.vocab_size,
        context_length=ck.model.seq_length,
    )
    model = load_remote(hf_dir)
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0
        )
    for row, ref in zip(out[:, width:].tolist(), ours, strict=True):
        theirs = row[: row.index(eod)] if eod in row else row
        assert theirs == ref.token_ids, (theirs, ref.token_ids)
    assert any(len(r.token_ids) >= 4 for r in ours)


@pytest.mark.parametrize("name", [n for n in CASES if not n.startswith("softmax")])
def test_cached_steps_equal_the_full_forward(name, exported):
    """Prefill, then one token per step through transformers' cache: every step's logits equal
    the full forward's (≤ 1e-5). A twicing layer's cache entry is ``[V | O1]`` (groups + heads
    along the head axis: O1 is cached, not recomputed); other layers cache plain K, V."""
    ck, hf_dir = exported[name]
    model = load_remote(hf_dir)
    x = torch.randint(0, 1024, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(input_ids=x, use_cache=False).logits
        out = model(input_ids=x[:, :20], use_cache=True)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        steps = [out.logits]
        for t in range(20, 24):
            steps.append(model(input_ids=x[:, t : t + 1], cache=cache, use_cache=True).logits)
    diff = (torch.cat(steps, dim=1) - full).abs().max().item()
    assert diff <= 1e-5 and cache.get_seq_length() == 24
    g, h = ck.model.query_groups, ck.model.num_attention_heads
    for i, layer in enumerate(cache.layers):
        twicing = ck.model.variant_of_layer(i) == "twicing"
        assert layer.keys.shape == (2, g, 24, ck.model.head_dim)
        assert layer.values.shape[1] == (g + h if twicing else g)


def test_export_loads_without_twicing_lm(exported):
    """A fresh Python in which twicing-lm's packages cannot be imported loads and runs the
    export (a user's machine), offline, and gets the same logits."""
    import subprocess
    import sys

    _, hf_dir = exported["resformer"]
    script = (
        "import sys, torch\n"
        "for name in ('pretrain', 'model', 'data_prep', 'megatron'):\n"
        "    sys.modules[name] = None  # any import of them now fails\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(hf_dir)!r}, trust_remote_code=True)\n"
        "x = torch.arange(40).reshape(2, 20)\n"
        "print(float(m(input_ids=x).logits.double().sum()))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    model = load_remote(hf_dir)
    with torch.no_grad():
        expected = float(model(input_ids=torch.arange(40).reshape(2, 20)).logits.double().sum())
    assert abs(float(done.stdout.split()[-1]) - expected) <= 1e-3 * max(1.0, abs(expected))


def test_exported_code_is_self_contained(exported):
    """The copied modeling code imports only torch, transformers, the stdlib and itself."""
    _, hf_dir = exported["neural-gqa"]
    for name in ("configuration_twicing.py", "modeling_twicing.py"):
        tree = ast.parse((hf_dir / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 or isinstance(node, ast.Import):
                mods = (
                    [node.module]
                    if isinstance(node, ast.ImportFrom)
                    else [a.name for a in node.names]
                )
                for mod in mods:
                    assert mod.split(".")[0] in {
                        "__future__",
                        "dataclasses",
                        "torch",
                        "transformers",
                    }


def test_unsupported_exports_are_refused(
    wikitext_manifest, tmp_path, capsys, one_rank, monkeypatch
):
    from pretrain.export import remote
    from pretrain.export_hf import main

    path = synthetic_checkpoint(tmp_path, wikitext_manifest, "t", attention="twicing", **LLAMA)
    argv = ["--checkpoint", str(path), "--out", str(tmp_path / "hf")]
    assert main([*argv, "--arch", "llama"]) == 2
    assert "layers [0, 1] use twicing attention" in capsys.readouterr().err
    assert main([*argv, "--arch", "mamba"]) == 2
    assert "unknown export architecture 'mamba'" in capsys.readouterr().err
    monkeypatch.setattr(remote, "SUPPORTED", ("softmax",))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "layer 0 uses 'twicing' attention" in err and "does not implement" in err
    assert not (tmp_path / "hf").exists()


def test_evaluate_hf_model_scores_a_custom_code_export(exported):
    """``pretrain.evaluate --hf-model`` loads a custom-code export (trust_remote_code from its
    ``auto_map``) and scores the checkpoint's NLL on the same windows."""
    from pretrain.checkpoint.load_model import load_model
    from pretrain.evaluation.driver import evaluate_text
    from pretrain.evaluation.hf_scorer import HFExport, hf_token_nll
    from pretrain.evaluation.texts import load_text

    ck, hf_dir = exported["neutreno-gqa"]
    export = HFExport(hf_dir, None)
    assert export.remote_code and not export.learned_positions
    hf = export.load()
    text = load_text("wikitext-2:valid", max_documents=1)
    kw = dict(length=64, stride=32, batch_size=4)
    ours = evaluate_text(load_model(ck, 0, 1), ck.tokenizer, text, **kw)
    theirs = evaluate_text(hf, ck.tokenizer, text, token_nll_fn=hf_token_nll(hf), **kw)
    assert ours["tokens"] == theirs["tokens"] > 100
    assert abs(ours["nll_sum"] - theirs["nll_sum"]) / ours["nll_sum"] <= 1e-6
