"""Adapter, both directions: our megatron-core GPT (learned positions + LayerNorm + GELU/ReLU)
and ``GPT2LMHeadModel``.

GELU is exact (erf, ``gelu``) or the tanh approximation (``gelu_new``, GPT-2's own, our
``gelu_tanh``); GPT-2's Conv1D weights are transposed ``nn.Linear``s and its ``c_attn`` holds
``[Q; K; V]``. Export only: a model without linear biases gets zero biases and a GQA model has
its key/value heads repeated (both exact). Import: GPT-2 always has biases and no GQA; a shorter
``seq_length`` keeps the first rows of the position table.
"""

from __future__ import annotations

import torch

from model import ModelConfig
from pretrain.export.config_json import ConfigJson
from pretrain.export.fused_qkv import fuse_qkv, repeat_kv_rows, split_qkv
from pretrain.export.mapping import Pair, Recipes, Take, from_hf, rename, to_hf, transposed

ARCHITECTURE = "GPT2LMHeadModel"
MODEL_TYPES = ("gpt2",)
#: transformers' ``activation_function`` ↔ ours
ACTIVATIONS = {"gelu": "gelu", "relu": "relu", "gelu_new": "gelu_tanh",
               "gelu_pytorch_tanh": "gelu_tanh"}  # fmt: skip
_EXPORTED = {"gelu": "gelu", "relu": "relu", "gelu_tanh": "gelu_new"}


# ---------------------------------------------------------------------------- weights
def _c_attn_split(t: torch.Tensor, cfg: ModelConfig, weight: bool) -> list[torch.Tensor]:
    q, k, v = split_qkv(t, cfg)
    if cfg.query_groups != cfg.num_attention_heads:  # GPT-2 has no GQA: repeat K/V heads
        k, v = repeat_kv_rows(k, cfg), repeat_kv_rows(v, cfg)
    fused = torch.cat([q, k, v], dim=0)
    return [fused.t() if weight else fused]


def _c_attn_join(ts, cfg: ModelConfig, weight: bool) -> torch.Tensor:
    rows = ts[0].t() if weight else ts[0]
    return fuse_qkv(*rows.chunk(3, dim=0), cfg)


def _c_attn(ours: str, theirs: str, cfg: ModelConfig, weight: bool) -> Pair:
    return Pair(
        ours,
        (theirs,),
        lambda ts: _c_attn_join(ts, cfg, weight),
        lambda t: _c_attn_split(t, cfg, weight),
    )


def _positions(cfg: ModelConfig) -> Pair:
    return Pair(
        "embedding.position_embeddings.weight",
        ("transformer.wpe.weight",),
        lambda ts: ts[0][: cfg.seq_length],
    )


def pairs(cfg: ModelConfig) -> list[Pair]:
    """Every tensor of a GPT-2-style model, ours ↔ theirs (linear biases only when ours has
    them: :func:`to_hf_weights` adds zeros for the others)."""
    bias = cfg.add_bias_linear
    out = [rename("embedding.word_embeddings.weight", "transformer.wte.weight"), _positions(cfg)]
    for i in range(cfg.num_layers):
        src, dst = f"decoder.layers.{i}.", f"transformer.h.{i}."
        attn, mlp = src + "self_attention.", src + "mlp."
        for ours, theirs in (("input_layernorm", "ln_1"), ("pre_mlp_layernorm", "ln_2")):
            out += [rename(f"{src}{ours}.{p}", f"{dst}{theirs}.{p}") for p in ("weight", "bias")]
        out += [
            _c_attn(attn + "linear_qkv.weight", dst + "attn.c_attn.weight", cfg, weight=True),
            transposed(attn + "linear_proj.weight", dst + "attn.c_proj.weight"),
            transposed(mlp + "linear_fc1.weight", dst + "mlp.c_fc.weight"),
            transposed(mlp + "linear_fc2.weight", dst + "mlp.c_proj.weight"),
        ]
        if bias:
            out += [
                _c_attn(attn + "linear_qkv.bias", dst + "attn.c_attn.bias", cfg, weight=False),
                rename(attn + "linear_proj.bias", dst + "attn.c_proj.bias"),
                rename(mlp + "linear_fc1.bias", dst + "mlp.c_fc.bias"),
                rename(mlp + "linear_fc2.bias", dst + "mlp.c_proj.bias"),
            ]
    out += [
        rename(f"decoder.final_layernorm.{p}", f"transformer.ln_f.{p}") for p in ("weight", "bias")
    ]
    if not cfg.tied_embeddings:
        out.append(rename("output_layer.weight", "lm_head.weight"))
    return out


def to_hf_weights(cfg: ModelConfig, take: Take) -> dict[str, torch.Tensor]:
    """HF GPT-2 parameters from our TP=1 weights (``take(name)`` pops one of ours)."""
    out = to_hf(pairs(cfg), take)
    if not cfg.add_bias_linear:
        out |= _zero_biases(cfg, out)
    return out


def _zero_biases(cfg: ModelConfig, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GPT-2's biases for a model that has none: zeros (exact)."""
    h, ffn = cfg.hidden_size, cfg.ffn_hidden_size or 4 * cfg.hidden_size
    dtype = out["transformer.wte.weight"].dtype
    sizes = {"attn.c_attn": 3 * h, "attn.c_proj": h, "mlp.c_fc": ffn, "mlp.c_proj": h}
    return {
        f"transformer.h.{i}.{name}.bias": torch.zeros(n, dtype=dtype)
        for i in range(cfg.num_layers)
        for name, n in sizes.items()
    }


def from_hf_weights(cfg: ModelConfig, take: Take) -> Recipes:
    """Our TP=1 weights from HF GPT-2 tensors, as recipes (see ``mapping.from_hf``)."""
    return from_hf(pairs(cfg), take)


# ---------------------------------------------------------------------------- config
def config_to_hf(cfg: ModelConfig, special: dict, dtype: torch.dtype):
    """The ``GPT2Config`` of ``cfg`` (``special``: bos/eos/pad token ids)."""
    import transformers

    ffn = cfg.ffn_hidden_size or 4 * cfg.hidden_size
    return transformers.GPT2Config(
        vocab_size=cfg.padded_vocab_size,
        n_positions=cfg.seq_length,
        n_embd=cfg.hidden_size,
        n_layer=cfg.num_layers,
        n_head=cfg.num_attention_heads,
        n_inner=ffn,
        activation_function=_EXPORTED[cfg.activation],  # "gelu" is exact (erf), as F.gelu
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=cfg.layernorm_epsilon,
        scale_attn_weights=True,
        tie_word_embeddings=cfg.tied_embeddings,
        architectures=[ARCHITECTURE],
        dtype=dtype,
        **special,
    )


def config_from_hf(cj: ConfigJson) -> dict:
    """``ModelConfig`` fields of a GPT-2 ``config.json``."""
    import math

    hidden, heads = cj.integer("n_embd"), cj.integer("n_head")
    if hidden % heads:
        cj.refuse("n_head", f"does not divide n_embd {hidden}")
    activation = cj.expect(
        "activation_function",
        tuple(ACTIVATIONS),
        f"supported: {', '.join(ACTIVATIONS)}",
        "gelu_new",
    )
    cj.expect("scale_attn_weights", (True,), "unscaled attention scores are not supported", True)
    why = "attention scaled by the inverse layer index is not supported"
    cj.expect("scale_attn_by_inverse_layer_idx", (False,), why, False)
    cj.expect("add_cross_attention", (False,), "cross-attention is not supported", False)
    vocab = cj.integer("vocab_size")
    return {
        "num_layers": cj.integer("n_layer"),
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "ffn_hidden_size": cj.integer("n_inner", 4 * hidden),
        "vocab_size": vocab,
        "vocab_pad_multiple": math.gcd(vocab, 128),  # no padding: the rows are the model's
        "seq_length": cj.integer("n_positions"),
        "position_embedding": "learned_absolute",
        "normalization": "LayerNorm",
        "layernorm_epsilon": cj.number("layer_norm_epsilon", 1e-5),
        "activation": ACTIVATIONS[activation],
        "add_bias_linear": True,
        "tied_embeddings": cj.flag("tie_word_embeddings", True),
        "init_std": cj.number("initializer_range", 0.02),
        "attention": "softmax",
        "attention_layers": "all",
        "attention_dropout": 0.0,
        "hidden_dropout": 0.0,
    }


def check_import(cj: ConfigJson, cfg: ModelConfig) -> None:
    """The position table has ``n_positions`` rows: a longer ``seq_length`` has no weights."""
    if cfg.seq_length > cj.integer("n_positions"):
        cj.refuse(
            "n_positions",
            f"model.seq_length={cfg.seq_length} needs more learned positions than the model has",
        )


def model_class():
    import transformers

    return transformers.GPT2LMHeadModel
