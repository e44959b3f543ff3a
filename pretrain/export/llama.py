"""Adapter, both directions: our megatron-core GPT (RoPE + RMSNorm + SwiGLU) and
``LlamaForCausalLM`` (``model_type`` ``llama``, and ``mistral`` without a sliding window that
bites).

RoPE is non-interleaved (rotate-half) in both; GQA maps to ``num_key_value_heads``; linear biases
map to ``attention_bias`` + ``mlp_bias`` (both or neither); RoPE scaling ``linear`` and
``llama3`` map to ``rope_parameters``. ``pairs`` is the one name mapping: export reads it ours →
theirs, import theirs → ours.
"""

from __future__ import annotations

import math

import torch

from model import ModelConfig
from pretrain.export.config_json import LLAMA3_FIXED, ConfigJson
from pretrain.export.fused_qkv import fuse_qkv, split_qkv
from pretrain.export.mapping import Pair, Recipes, Take, concatenated, from_hf, rename, to_hf

ARCHITECTURE = "LlamaForCausalLM"
MODEL_TYPES = ("llama", "mistral")


# ---------------------------------------------------------------------------- weights
def qkv_pair(ours: str, theirs: str, cfg: ModelConfig) -> Pair:
    """Our fused QKV rows ↔ separate ``q_proj``/``k_proj``/``v_proj`` (``theirs``: the prefix
    ``….self_attn.{}_proj.weight`` with ``{}`` for q, k, v)."""
    return Pair(
        ours,
        tuple(theirs.format(n) for n in "qkv"),
        lambda ts: fuse_qkv(*ts, cfg),
        lambda t: split_qkv(t, cfg),
    )


def pairs(cfg: ModelConfig) -> list[Pair]:
    """Every tensor of a Llama-style model, ours ↔ theirs (Qwen2's QKV-only bias included)."""
    out = [rename("embedding.word_embeddings.weight", "model.embed_tokens.weight")]
    for i in range(cfg.num_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        attn, mlp = src + "self_attention.", src + "mlp."
        out += [
            rename(src + "input_layernorm.weight", dst + "input_layernorm.weight"),
            rename(src + "pre_mlp_layernorm.weight", dst + "post_attention_layernorm.weight"),
            qkv_pair(attn + "linear_qkv.weight", dst + "self_attn.{}_proj.weight", cfg),
            rename(attn + "linear_proj.weight", dst + "self_attn.o_proj.weight"),
            concatenated(
                mlp + "linear_fc1.weight",
                (dst + "mlp.gate_proj.weight", dst + "mlp.up_proj.weight"),
            ),
            rename(mlp + "linear_fc2.weight", dst + "mlp.down_proj.weight"),
        ]
        if cfg.add_bias_linear or cfg.qkv_bias:
            out.append(qkv_pair(attn + "linear_qkv.bias", dst + "self_attn.{}_proj.bias", cfg))
        if cfg.add_bias_linear:
            out += [
                rename(attn + "linear_proj.bias", dst + "self_attn.o_proj.bias"),
                concatenated(
                    mlp + "linear_fc1.bias", (dst + "mlp.gate_proj.bias", dst + "mlp.up_proj.bias")
                ),
                rename(mlp + "linear_fc2.bias", dst + "mlp.down_proj.bias"),
            ]
    out.append(rename("decoder.final_layernorm.weight", "model.norm.weight"))
    if not cfg.tied_embeddings:
        out.append(rename("output_layer.weight", "lm_head.weight"))
    return out


def to_hf_weights(cfg: ModelConfig, take: Take) -> dict[str, torch.Tensor]:
    """HF Llama parameters from our TP=1 weights (``take(name)`` pops one of ours)."""
    return to_hf(pairs(cfg), take)


def from_hf_weights(cfg: ModelConfig, take: Take) -> Recipes:
    """Our TP=1 weights from HF Llama tensors, as recipes (see ``mapping.from_hf``)."""
    return from_hf(pairs(cfg), take)


# ---------------------------------------------------------------------------- config
def rope_parameters(cfg: ModelConfig) -> dict:
    """transformers' ``rope_parameters`` of ``cfg`` (what :meth:`ConfigJson.rope` reads back)."""
    params: dict = {"rope_type": "default", "rope_theta": float(cfg.rotary_base)}
    if cfg.rope_scaling == "linear":
        params |= {"rope_type": "linear", "factor": cfg.rope_scaling_factor}
    elif cfg.rope_scaling == "llama3":
        params |= {"rope_type": "llama3", "factor": cfg.rope_scaling_factor, **LLAMA3_FIXED}
    return params


def config_to_hf(cfg: ModelConfig, special: dict, dtype: torch.dtype):
    """The ``LlamaConfig`` of ``cfg`` (``special``: bos/eos/pad token ids)."""
    import transformers

    ffn = cfg.ffn_hidden_size or 4 * cfg.hidden_size
    return transformers.LlamaConfig(
        vocab_size=cfg.padded_vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=ffn,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.query_groups,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        max_position_embeddings=cfg.seq_length,
        rms_norm_eps=cfg.layernorm_epsilon,
        tie_word_embeddings=cfg.tied_embeddings,
        attention_bias=cfg.add_bias_linear,
        mlp_bias=cfg.add_bias_linear,
        attention_dropout=0.0,
        architectures=[ARCHITECTURE],
        dtype=dtype,
        rope_parameters=rope_parameters(cfg),
        **special,
    )


def decoder_fields(cj: ConfigJson, tied_default: bool) -> dict:
    """``ModelConfig`` fields shared by Llama, Mistral and Qwen2 configs (attention softmax in
    every layer, dropout off: overrides choose them)."""
    hidden, heads = cj.integer("hidden_size"), cj.integer("num_attention_heads")
    if hidden % heads:
        cj.refuse("num_attention_heads", f"does not divide hidden_size {hidden}")
    head_dim = cj.get("head_dim")
    if head_dim is not None and head_dim != hidden // heads:
        cj.refuse(
            "head_dim",
            f"twicing-lm's head dimension is hidden_size / num_attention_heads = "
            f"{hidden // heads}; another one is not supported",
        )
    cj.expect("hidden_act", ("silu",), "SwiGLU with silu is the only MLP here", "silu")
    groups = cj.integer("num_key_value_heads", heads)
    if heads % groups:
        cj.refuse("num_key_value_heads", f"does not divide num_attention_heads {heads}")
    vocab = cj.integer("vocab_size")
    return {
        "num_layers": cj.integer("num_hidden_layers"),
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_query_groups": None if groups == heads else groups,
        "ffn_hidden_size": cj.integer("intermediate_size"),
        "vocab_size": vocab,
        "vocab_pad_multiple": math.gcd(vocab, 128),  # no padding: the rows are the model's
        "seq_length": cj.integer("max_position_embeddings"),
        "position_embedding": "rope",
        **cj.rope(),
        "normalization": "RMSNorm",
        "layernorm_epsilon": cj.number("rms_norm_eps", 1e-6),
        "activation": "swiglu",
        "tied_embeddings": cj.flag("tie_word_embeddings", tied_default),
        "init_std": cj.number("initializer_range", 0.02),
        "attention": "softmax",
        "attention_layers": "all",
        "attention_dropout": 0.0,
        "hidden_dropout": 0.0,
    }


def config_from_hf(cj: ConfigJson) -> dict:
    """``ModelConfig`` fields of a Llama or Mistral ``config.json``."""
    attention_bias = cj.flag("attention_bias", False)
    if cj.flag("mlp_bias", False) != attention_bias:
        cj.refuse(
            "mlp_bias",
            f"with attention_bias={attention_bias}: twicing-lm has biases on every linear "
            "layer or on none (or on Q, K, V only: Qwen2)",
        )
    return decoder_fields(cj, tied_default=False) | {"add_bias_linear": attention_bias}


def check_sliding_window(cj: ConfigJson, cfg: ModelConfig, window: int | None) -> None:
    """Refuse a sliding window shorter than the sequences we train on (within the window,
    sliding-window attention is full causal attention, so a shorter ``seq_length`` imports)."""
    if window is not None and window < cfg.seq_length:
        cj.refuse(
            "sliding_window",
            f"sliding-window attention differs from full attention beyond {window} tokens and "
            f"seq_length is {cfg.seq_length}: import with model.seq_length={window} (or less)",
        )


def check_import(cj: ConfigJson, cfg: ModelConfig) -> None:
    """Refusals that depend on the final (overridden) config: Mistral's window (transformers'
    default 4096 when the key is absent, none when it is null)."""
    if cj.get("model_type") == "mistral":
        check_sliding_window(cj, cfg, cj.data.get("sliding_window", 4096))


def model_class():
    import transformers

    return transformers.LlamaForCausalLM
