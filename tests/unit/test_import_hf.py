"""Hugging Face import (``pretrain.import_hf``), in one process: tiny models made here with
``transformers`` (Llama GQA untied with Llama 3.1 RoPE, Llama tied with biases and linear RoPE,
Mistral, Qwen2 with QKV biases, GPT-2) import to checkpoints whose logits equal the HF model's
(≤ 1e-5); HF → import → export gives the same safetensors tensors and ours → export → import the
same weights, bit for bit; a retrofit keeps every weight and its custom-code export computes our
logits; new parameters are drawn as ``build_gpt`` draws them; ``checkpoint.init_from`` loads an
import bit for bit; bad input is refused naming the file or key, with nothing written.
(TP2/PP2 and the training runs: ``tests/integration/test_import_hf_run.py``.)"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from conftest import need_module

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
transformers = need_module("transformers")

import hf_models  # noqa: E402

from data_prep.base.errors import CheckpointError, ConfigError  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
EXPORT_ARCH = {"llama-gqa-untied": "LlamaForCausalLM", "llama-tied-bias": "LlamaForCausalLM",
               "mistral": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "gpt2": "GPT2LMHeadModel"}  # fmt: skip


import_model = hf_models.import_here


def weights(run: Path) -> dict[str, torch.Tensor]:
    from pretrain.checkpoint.reader import full_state_dict, open_checkpoint

    return full_state_dict(open_checkpoint(run))


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory, wikitext_manifest) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf-models")
    tok = hf_models.tokenizer_model(wikitext_manifest)
    return {name: hf_models.make(name, root / name, tok) for name in hf_models.ARCHS}


@pytest.fixture(scope="module")
def imported(hf_dirs, tmp_path_factory, one_rank) -> dict[str, Path]:
    """Every architecture imported once at TP=1."""
    root = tmp_path_factory.mktemp("imports")
    return {name: import_model(d, root / name) for name, d in hf_dirs.items()}


# ------------------------------------------------------------------------------ logits
@pytest.mark.parametrize("name", list(hf_models.ARCHS))
def test_imported_logits_equal_the_hf_models(name, hf_dirs, imported, one_rank):
    from pretrain.checkpoint.reader import open_checkpoint

    ck = open_checkpoint(imported[name])
    assert ck.state.origin == "import" and ck.step == 0
    assert ck.state.topology.describe() == "TP1×DP1 ZeRO-0"
    ids = hf_models.random_ids()
    ours, theirs = hf_models.our_logits(ck, ids), hf_models.logits(hf_dirs[name], ids)
    diff = (ours - theirs).abs().max().item()
    print(f"{name}: max |logit diff| {diff:.3g}")
    assert ours.shape == theirs.shape == (2, 64, 1024)
    assert diff <= 1e-5 and theirs.abs().max() > 0.5
    expected = {
        "llama-gqa-untied": dict(num_query_groups=2, rope_scaling="llama3", tied_embeddings=False),
        "llama-tied-bias": dict(add_bias_linear=True, rope_scaling="linear", tied_embeddings=True),
        "mistral": dict(num_query_groups=2, add_bias_linear=False),
        "qwen2": dict(qkv_bias=True, add_bias_linear=False, rotary_base=1000000),
        "gpt2": dict(activation="gelu_tanh", position_embedding="learned_absolute"),
    }[name]
    assert {k: getattr(ck.model, k) for k in expected} == expected


# ------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("name", list(hf_models.ARCHS))
def test_hf_import_export_gives_the_same_safetensors(name, hf_dirs, imported, tmp_path, one_rank):
    from safetensors.torch import load_file

    from pretrain.export.hf_export import export

    meta = export(imported[name], tmp_path / "hf")
    assert meta["architecture"] == EXPORT_ARCH[name]
    before = load_file(hf_dirs[name] / "model.safetensors")
    after = load_file(tmp_path / "hf" / "model.safetensors")
    assert sorted(after) == sorted(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    source, exported = (
        json.loads((d / "config.json").read_text()) for d in (hf_dirs[name], tmp_path / "hf")
    )
    keys = ["vocab_size", "tie_word_embeddings", "rope_parameters", "num_key_value_heads",
            "rms_norm_eps", "activation_function", "n_positions"]  # fmt: skip
    assert {k: exported.get(k) for k in keys if k in source} == {
        k: source[k] for k in keys if k in source
    }


#: our models (test_export_hf's synthetic checkpoints) that export to an architecture the
#: import reads back exactly (a GPT-2 export of a no-bias or GQA model adds zero biases or
#: repeated heads, which come back as parameters)
OURS = {
    "llama": dict(position_embedding="rope", normalization="RMSNorm", activation="swiglu",
                  add_bias_linear=False, tied_embeddings=False, num_query_groups=2),
    "qwen2": dict(position_embedding="rope", normalization="RMSNorm", activation="swiglu",
                  add_bias_linear=False, qkv_bias=True, rope_scaling="llama3",
                  rope_scaling_factor=4.0),
    "gpt2": dict(position_embedding="learned_absolute", normalization="LayerNorm",
                 activation="gelu_tanh"),
    "twicing-custom-code": dict(attention="twicing", attention_layers="last:1",
                                num_query_groups=2, rope_scaling="linear", rope_scaling_factor=2.0),
    "neural-custom-code": dict(attention="neural", attention_options={"dim": 4},
                               add_bias_linear=False, qkv_bias=True, tied_embeddings=False),
}  # fmt: skip


@pytest.mark.parametrize("name", list(OURS))
def test_ours_export_import_gives_the_same_weights(name, wikitext_manifest, tmp_path, one_rank):
    from test_export_hf import synthetic_checkpoint

    from pretrain.checkpoint.reader import full_state_dict, open_checkpoint
    from pretrain.export.hf_export import export

    ck = open_checkpoint(synthetic_checkpoint(tmp_path, wikitext_manifest, name, **OURS[name]))
    export(ck, tmp_path / "hf")
    back = weights(import_model(tmp_path / "hf", tmp_path / "run"))
    ours = full_state_dict(ck)
    assert sorted(back) == sorted(ours)
    assert all(torch.equal(back[k], ours[k]) for k in ours)
    again = open_checkpoint(tmp_path / "run").model
    keys = ("attention", "attention_layers", "rotary_base", "rope_scaling", "rope_scaling_factor",
            "qkv_bias", "add_bias_linear", "activation", "tied_embeddings",
            "padded_vocab_size")  # fmt: skip
    assert {k: getattr(again, k) for k in keys} == {k: getattr(ck.model, k) for k in keys}


def test_sharded_safetensors_and_a_pytorch_bin_give_the_same_weights(
    hf_dirs, imported, tmp_path, one_rank
):
    """The same model as sharded safetensors (``model.safetensors.index.json``, read through
    memory maps) and as a weights-only ``pytorch_model.bin`` with GPT-2's own base-model names
    (no ``transformer.`` prefix) imports to the same weights, bit for bit."""
    from safetensors.torch import load_file

    sharded = tmp_path / "sharded"
    hf_models.load(hf_dirs["llama-gqa-untied"]).save_pretrained(sharded, max_shard_size="100KB")
    shutil.copy(hf_dirs["llama-gqa-untied"] / "tokenizer.model", sharded)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*.safetensors"))) >= 3
    pickled = shutil.copytree(hf_dirs["gpt2"], tmp_path / "pickled")
    tensors = load_file(pickled / "model.safetensors")
    (pickled / "model.safetensors").unlink()
    bare = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    assert "wte.weight" in bare
    torch.save(bare, pickled / "pytorch_model.bin")
    for source, name in ((sharded, "llama-gqa-untied"), (pickled, "gpt2")):
        got, expected = (
            weights(import_model(source, tmp_path / f"run-{name}")),
            weights(imported[name]),
        )
        assert sorted(got) == sorted(expected)
        assert all(torch.equal(got[k], expected[k]) for k in expected)


# ------------------------------------------------------------------------------ layouts
def test_tp2_pp2_import_holds_each_ranks_part(hf_dirs, imported, tmp_path, one_rank):
    """At parallel.tensor=2 parallel.pipeline=2: four model-states files, each with its stage's
    global names only (the tied embedding's copy on the last stage), merging to the TP=1
    import bit for bit."""
    from pretrain.checkpoint.reader import open_checkpoint, saved_shard

    run = import_model(hf_dirs["llama-gqa-untied"], tmp_path / "run", "parallel.tensor=2",
                       "parallel.pipeline=2")  # fmt: skip
    ck = open_checkpoint(run)
    assert ck.state.topology.describe() == "TP2×DP1×PP2 ZeRO-0"
    stages = [set(saved_shard(ck, mp)) for mp in range(4)]
    assert stages[0] == stages[1] and stages[2] == stages[3]
    assert "embedding.word_embeddings.weight" in stages[0] - stages[2]
    assert {"output_layer.weight", "decoder.final_layernorm.weight"} <= stages[2] - stages[0]
    assert {n.split(".")[2] for n in stages[0] if n.startswith("decoder.layers.")} == {"0", "1"}
    assert {n.split(".")[2] for n in stages[2] if n.startswith("decoder.layers.")} == {"2", "3"}
    qkv = "decoder.layers.0.self_attention.linear_qkv.weight"
    assert saved_shard(ck, 0)[qkv].shape == (64, 64)  # half of (4 + 2·2 heads)·16 rows
    merged, tp1 = weights(run), weights(imported["llama-gqa-untied"])
    assert sorted(merged) == sorted(tp1) and all(torch.equal(merged[k], tp1[k]) for k in tp1)

    tied = open_checkpoint(import_model(hf_dirs["gpt2"], tmp_path / "tied", "parallel.pipeline=2"))
    last = saved_shard(tied, 1)
    assert torch.equal(last["output_layer.weight"], weights(imported["gpt2"])[
        "embedding.word_embeddings.weight"])  # fmt: skip


# ------------------------------------------------------------------------------ retrofit
RETROFITS = {
    # base architecture, overrides
    "twicing": ("llama-gqa-untied", ["model.attention=twicing", "model.attention_layers=last:2"]),
    "neutreno": ("qwen2", ["model.attention=neutreno", "model.attention_options={lambda: 0.5}"]),
    "resformer": ("llama-tied-bias", ["model.attention=resformer"]),
    "twicing-gpt2": ("gpt2", ["model.attention=twicing", "model.attention_layers=[1]"]),
}


@pytest.mark.parametrize("variant", list(RETROFITS))
def test_retrofit_keeps_every_weight_and_exports_as_custom_code(
    variant, hf_dirs, imported, tmp_path, one_rank
):
    """A softmax model imported with another attention: every weight bit-identical to the plain
    import (these variants add no parameters), the variant really computes (other logits than
    softmax), and the custom-code export gives our logits."""
    from pretrain.checkpoint.reader import open_checkpoint
    from pretrain.export.hf_export import export

    base, overrides = RETROFITS[variant]
    run = import_model(hf_dirs[base], tmp_path / "run", *overrides)
    plain, retro = weights(imported[base]), weights(run)
    assert sorted(retro) == sorted(plain) and all(torch.equal(retro[k], plain[k]) for k in plain)
    ck = open_checkpoint(run)
    layers = [ck.model.variant_of_layer(i) for i in range(ck.model.num_layers)]
    assert layers[0] == "softmax" and layers[-1] == variant.split("-")[0]
    ids = hf_models.random_ids()
    ours = hf_models.our_logits(ck, ids)
    softmax = hf_models.our_logits(open_checkpoint(imported[base]), ids)
    assert (ours - softmax).abs().max() > 1e-3
    meta = export(ck, tmp_path / "hf")
    assert meta["architecture"] == "TwicingForCausalLM"
    theirs = hf_models.logits(tmp_path / "hf", ids, trust_remote_code=True)
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_new_parameters_are_drawn_as_build_gpt_draws_them(hf_dirs, imported, tmp_path, one_rank):
    """Neural Attention adds scorer weights: they are what ``build_gpt`` at ``training.seed``
    initialises (bit for bit), the rest is the plain import, and the command names them."""
    from model import build_gpt
    from pretrain.checkpoint.reader import open_checkpoint

    run = import_model(hf_dirs["qwen2"], tmp_path / "run", "model.attention=neural",
                       "model.attention_layers=last:1", "training.seed=77")  # fmt: skip
    record = json.loads((run / "import_hf.json").read_text())
    new = record["new_parameters"]
    assert new and all(n.startswith("decoder.layers.1.self_attention.core_attention.") for n in new)
    torch.manual_seed(77)
    fresh = build_gpt(open_checkpoint(run).model).state_dict()
    got, plain = weights(run), weights(imported["qwen2"])
    assert all(torch.equal(got[n], fresh[n]) for n in new)
    assert all(torch.equal(got[k], plain[k]) for k in plain)


# ------------------------------------------------------------------------------ tokenizers
def test_a_byte_level_bpe_tokenizer_json_comes_along(hf_dirs, tmp_path, one_rank):
    """A GPT-2 with a ``tokenizer.json`` (byte-level BPE; preferred over a ``tokenizer.model``
    beside it): the checkpoint keeps it as ``tokenizer/``, and the checkpoint's tokenizer encodes
    as ``AutoTokenizer`` on the HF directory does."""
    from data_prep.sources import Corpus
    from data_prep.train_hf_tokenizer import train_hf_bpe
    from pretrain.checkpoint.reader import open_checkpoint

    docs = [f"The {i}th line of text, with numbers {i * 7} and émojis 🙂." for i in range(200)]
    bpe = train_hf_bpe([Corpus("t", documents=lambda: docs, fingerprint="t")], tmp_path / "bpe",
                       400, progress=False)  # fmt: skip
    hf = tmp_path / "gpt2-bpe"
    shutil.copytree(hf_dirs["gpt2"], hf)
    for f in bpe.iterdir():
        shutil.copy(f, hf / f.name)
    ck = open_checkpoint(import_model(hf, tmp_path / "run"))
    assert ck.state.tokenizer.file == "tokenizer"
    assert (ck.tag_dir / "tokenizer" / "tokenizer.json").is_file()
    auto = transformers.AutoTokenizer.from_pretrained(hf, local_files_only=True)
    for text in docs[:5] + ["  odd   spacing\nand lines 日本語"]:
        assert ck.tokenizer.encode(text) == auto(text, add_special_tokens=False)["input_ids"]
    assert ck.tokenizer.eod == auto.eos_token_id


# ------------------------------------------------------------------------------ init_from
def test_init_from_loads_an_import_bit_for_bit(hf_dirs, imported, one_rank):
    """The loader the trainer hands to ``build_engine``: a fresh model (another attention) ends
    with the import's weights exactly, and the differences are named."""
    from model import build_gpt
    from pretrain.checkpoint.init_from import weights_loader
    from pretrain.checkpoint.reader import open_checkpoint

    ck = open_checkpoint(imported["llama-gqa-untied"])
    cfg = type(ck.model)(**{**vars(ck.model), "attention": "twicing", "attention_layers": "last:2"})
    said: list[str] = []
    load = weights_loader(ck.tag_dir, cfg, _tokenizer_info(ck), said.append)
    torch.manual_seed(5)
    model = build_gpt(cfg)
    load(model)
    got = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    source = weights(imported["llama-gqa-untied"])
    assert sorted(got) == sorted(source) and all(torch.equal(got[k], source[k]) for k in got)
    assert any("attention 'softmax' -> 'twicing'" in s for s in said)


def test_init_from_keeps_new_parameters_and_refuses_other_shapes(imported, one_rank):
    from model import build_gpt
    from pretrain.checkpoint.init_from import weights_loader
    from pretrain.checkpoint.reader import open_checkpoint

    ck = open_checkpoint(imported["qwen2"])
    neural = type(ck.model)(**{**vars(ck.model), "attention": "neural"})
    said: list[str] = []
    torch.manual_seed(3)
    model = build_gpt(neural)
    init = {k: v.clone() for k, v in model.state_dict().items() if ".core_attention." in k}
    weights_loader(ck.tag_dir, neural, _tokenizer_info(ck), said.append)(model)
    after = model.state_dict()
    assert init and all(torch.equal(after[k], v) for k, v in init.items())
    line = next(s for s in said if "keep their initialisation from the run seed" in s)
    assert line.startswith(f"[train] init_from: {2 * 8} parameters not in {ck.tag_dir}")

    wider = type(ck.model)(**{**vars(ck.model), "ffn_hidden_size": 128})
    with pytest.raises(CheckpointError, match=r"ffn_hidden_size 96 there, 128 here"):
        weights_loader(ck.tag_dir, wider, _tokenizer_info(ck), said.append)
    other = _tokenizer_info(ck)
    other = type(other)(other.file, "0" * 64, other.vocab_size, other.eod)
    with pytest.raises(CheckpointError, match="tokenizer sha256"):
        weights_loader(ck.tag_dir, ck.model, other, said.append)


def _tokenizer_info(ck):
    return ck.state.tokenizer


def test_an_import_is_not_resumed_and_init_from_is_not_the_run_itself(imported, tmp_path):
    from pretrain.checkpoint.reader import open_checkpoint
    from pretrain.checkpoint.resume import plan_resume
    from pretrain.train_config import load_config

    state = open_checkpoint(imported["gpt2"]).state
    with pytest.raises(CheckpointError, match=r"checkpoint.init_from=<this run directory>"):
        plan_resume(state, state.model_config, state.topology, reshard=False)
    base = [f"run_dir={tmp_path / 'run'}", "data.manifest=m.json", "model.num_layers=2"]
    for same in (tmp_path / "run", tmp_path / "run" / "checkpoints"):
        with pytest.raises(ConfigError, match=r"checkpoint.init_from.*this run's own directory"):
            load_config(None, [*base, f"checkpoint.init_from={same}"])
    cfg = load_config(None, [*base, f"checkpoint.init_from={imported['gpt2']}"])
    assert cfg.checkpoint.init_from == str(imported["gpt2"])


def test_checkpoints_written_before_the_new_model_keys_still_resume(imported):
    """A trained checkpoint whose model config predates ``qkv_bias``/``rope_scaling``/
    ``rope_scaling_factor`` resumes (their defaults are what older code computed); a real
    difference is still refused."""
    import dataclasses

    from pretrain.checkpoint.reader import open_checkpoint
    from pretrain.checkpoint.resume import plan_resume

    state = open_checkpoint(imported["llama-gqa-untied"]).state
    model = dict(state.model_config, rope_scaling="none", rope_scaling_factor=1.0)
    old = {k: v for k, v in model.items() if k not in ("qkv_bias", "rope_scaling",
                                                       "rope_scaling_factor")}  # fmt: skip
    trained = dataclasses.replace(state, origin="train", config={"model": old})
    assert plan_resume(trained, model, state.topology, reshard=False) is False
    with pytest.raises(CheckpointError, match=r"qkv_bias: False -> True"):
        plan_resume(trained, dict(model, qkv_bias=True), state.topology, reshard=False)


# ------------------------------------------------------------------------------ refusals
def _edit_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize(
    ("base", "changes", "needle"),
    [
        ("mistral", {"sliding_window": 32}, "'sliding_window' = 32: sliding-window attention"),
        ("qwen2", {"use_sliding_window": True, "sliding_window": 16}, "'sliding_window' = 16"),
        ("llama-gqa-untied", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0,
                                                  "rope_theta": 1e4}}, "rope_type 'yarn'"),
        ("llama-gqa-untied", {"rope_parameters": {**hf_models.LLAMA3, "low_freq_factor": 2.0}},
         "low_freq_factor=2.0: megatron-core 0.16.1"),
        ("llama-gqa-untied", {"head_dim": 32}, "'head_dim' = 32"),
        ("llama-gqa-untied", {"mlp_bias": True}, "'mlp_bias' = True"),
        ("llama-gqa-untied", {"hidden_act": "gelu"}, "'hidden_act' = 'gelu'"),
        ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "'scale_attn_by_inverse_layer_idx'"),
        ("gpt2", {"model_type": "gpt_neox"}, "'model_type' = 'gpt_neox': not an architecture"),
        ("qwen2", {"vocab_size": 1000}, "'vocab_size' = 1000: the tokenizer"),
    ],
)  # fmt: skip
def test_what_does_not_map_exactly_is_refused_naming_the_key(
    base, changes, needle, hf_dirs, tmp_path, one_rank
):
    from pretrain.export.hf_import import plan_import

    hf = _edit_config(hf_dirs[base], tmp_path / "hf", **changes)
    with pytest.raises(ConfigError) as e:
        plan_import(hf, [])
    assert needle in str(e.value) and str(hf / "config.json") in str(e.value)


def test_overrides_may_retrofit_but_not_reshape(hf_dirs, tmp_path, one_rank):
    from pretrain.export.hf_import import plan_import

    hf = hf_dirs["mistral"]
    with pytest.raises(ConfigError, match=r"'model.hidden_size': 32 differs from 64"):
        plan_import(hf, ["model.hidden_size=32"])
    with pytest.raises(ConfigError, match=r"'model.vocab_pad_multiple': 100 pads the vocabulary"):
        plan_import(hf, ["model.vocab_pad_multiple=100"])
    with pytest.raises(ConfigError, match=r"'optimizer.lr': an import takes model"):
        plan_import(hf, ["optimizer.lr=1"])
    with pytest.raises(ConfigError, match=r"'model.num_attention_heads': 4 heads .* 8"):
        plan_import(hf, ["parallel.tensor=8"])
    assert plan_import(hf, ["model.seq_length=32", "parallel.tensor=2"]).model.seq_length == 32
    odd = _edit_config(hf_dirs["gpt2"], tmp_path / "odd", vocab_size=1025)
    with pytest.raises(
        ConfigError, match=r"'vocab_size' = 1025: the embedding's rows do not split"
    ):
        plan_import(odd, ["parallel.tensor=2"])


def test_weights_that_do_not_fit_are_refused_naming_them(hf_dirs, tmp_path, one_rank):
    """A tensor the config does not declare (an undeclared bias) and tensors of another shape
    than the config implies: refused naming the tensor and the file, nothing written."""
    from safetensors.torch import load_file, save_file

    from pretrain.export.hf_import import plan_import
    from pretrain.export.import_writer import write_import

    extra = _edit_config(hf_dirs["mistral"], tmp_path / "extra")
    tensors = load_file(extra / "model.safetensors")
    tensors["model.layers.1.self_attn.o_proj.bias"] = torch.zeros(64)
    save_file(tensors, extra / "model.safetensors", metadata={"format": "pt"})
    needle = r"model.safetensors: tensor 'model.layers.1.self_attn.o_proj.bias' \(and 0 more\)"
    with pytest.raises(ConfigError, match=needle + " has no place"):
        write_import(plan_import(extra, []), tmp_path / "out", {})
    shaped = _edit_config(hf_dirs["mistral"], tmp_path / "shaped", intermediate_size=128)
    with pytest.raises(CheckpointError, match=r"model.safetensors: model.layers.0.mlp.gate_proj"
                                              r".weight \[96, 64\]"):  # fmt: skip
        write_import(plan_import(shaped, []), tmp_path / "out", {})
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if "import-tmp" in p.name]


def _cli(*argv: str) -> tuple[int, str]:
    """The real command (forked from the pre-warmed test server); ``(exit code, output)``."""
    from launch import run_command

    env = {"PATH": os.environ["PATH"], "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"}
    return run_command(["-m", "pretrain.import_hf", *argv], env)


class _Payload:
    """Unpickling this calls ``open(flag, "w")``: creates the flag file (code execution)."""

    def __init__(self, flag: Path):
        self.flag = str(flag)

    def __reduce__(self):
        return (open, (self.flag, "w"))


def test_the_command_imports_and_refuses_bad_files(hf_dirs, tmp_path):
    """The real command: an import (then a second one replacing it), and exit 2/4 naming the
    file for a directory without config.json, a truncated safetensors file and a pickle
    ``pytorch_model.bin`` carrying a payload (never run); nothing written for any of them."""
    out = tmp_path / "run"
    code, text = _cli("--hf-model", str(hf_dirs["qwen2"]), "--out", str(out),
                      "model.attention=neural", "model.attention_layers=last:1")  # fmt: skip
    assert code == 0, text[-3000:]
    assert f"-> {out}/checkpoints/step_00000000 at TP1" in text
    assert "8 parameters not in" in text and "training.seed=1234" in text
    code, text = _cli("--hf-model", str(hf_dirs["qwen2"]), "--out", str(out), "parallel.tensor=2")
    assert code == 0, text[-3000:]
    assert sorted(p.name for p in (out / "checkpoints/step_00000000").glob("mp_rank_*")) == [
        "mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"]  # fmt: skip

    empty = tmp_path / "empty"
    empty.mkdir()
    truncated = shutil.copytree(hf_dirs["mistral"], tmp_path / "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    payload = shutil.copytree(hf_dirs["gpt2"], tmp_path / "payload")
    (payload / "model.safetensors").unlink()
    flag = tmp_path / "pwned"
    (payload / "pytorch_model.bin").write_bytes(pickle.dumps({"w": _Payload(flag)}))
    cases = [
        (empty, 2, f"--hf-model {empty} has no config.json"),
        (truncated, 4, f"{truncated / 'model.safetensors'}: not a readable safetensors file"),
        (payload, 4, f"{payload / 'pytorch_model.bin'}: refused as unsafe to unpickle"),
    ]
    for source, code, needle in cases:
        target = tmp_path / f"out-{source.name}"
        got, text = _cli("--hf-model", str(source), "--out", str(target))
        assert got == code and needle in text, text[-2000:]
        assert "Traceback" not in text and not target.exists() and not flag.exists()

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    code, text = _cli("--hf-model", str(hf_dirs["gpt2"]), "--out", str(busy))
    assert code == 2 and "neither empty nor an earlier import" in text
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]
