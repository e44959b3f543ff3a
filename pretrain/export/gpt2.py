"""Weight adapter: our megatron-core GPT (learned positions + LayerNorm + GELU/ReLU) as
``GPT2LMHeadModel``.

GELU is exact (erf) in both; a model without linear biases gets zero biases and a GQA model has
its key/value heads repeated (both exact); GPT-2's Conv1D weights are transposed ``nn.Linear``s.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from model import ModelConfig
from pretrain.export.fused_qkv import repeat_kv_rows, split_qkv

Take = Callable[[str], torch.Tensor]


def hf_config(cfg: ModelConfig, special: dict, dtype: torch.dtype):
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
        activation_function=cfg.activation,  # "gelu" is exact (erf) GELU, as megatron's F.gelu
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=cfg.layernorm_epsilon,
        scale_attn_weights=True,
        tie_word_embeddings=cfg.tied_embeddings,
        architectures=["GPT2LMHeadModel"],
        dtype=dtype,
        **special,
    )


def model_class():
    import transformers

    return transformers.GPT2LMHeadModel


def convert(cfg: ModelConfig, take: Take) -> dict[str, torch.Tensor]:
    """HF GPT-2 parameters from our TP=1 weights (``take(name)`` pops one of ours)."""
    out: dict[str, torch.Tensor] = {}
    ffn = cfg.ffn_hidden_size or 4 * cfg.hidden_size
    bias = cfg.add_bias_linear
    h = cfg.hidden_size
    out["transformer.wte.weight"] = take("embedding.word_embeddings.weight")
    out["transformer.wpe.weight"] = take("embedding.position_embeddings.weight")

    def linear(name: str, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
        w = take(name + ".weight")
        b = take(name + ".bias") if bias else torch.zeros(n_out, dtype=w.dtype)
        return w, b

    for i in range(cfg.num_layers):
        src, dst = f"decoder.layers.{i}.", f"transformer.h.{i}."
        for ours, theirs in (("input_layernorm", "ln_1"), ("pre_mlp_layernorm", "ln_2")):
            out[dst + theirs + ".weight"] = take(src + ours + ".weight")
            out[dst + theirs + ".bias"] = take(src + ours + ".bias")
        w, b = linear(
            src + "self_attention.linear_qkv",
            (cfg.num_attention_heads + 2 * cfg.query_groups) * cfg.head_dim,
        )
        q, k, v = split_qkv(w, cfg)
        qb, kb, vb = split_qkv(b, cfg)
        if cfg.query_groups != cfg.num_attention_heads:  # GPT-2 has no GQA: repeat K/V heads
            k, v, kb, vb = (repeat_kv_rows(x, cfg) for x in (k, v, kb, vb))
        # GPT-2's Conv1D computes x @ W + b with W [in, out]: transposed nn.Linear weights
        out[dst + "attn.c_attn.weight"] = torch.cat([q, k, v], dim=0).t()
        out[dst + "attn.c_attn.bias"] = torch.cat([qb, kb, vb], dim=0)
        w, b = linear(src + "self_attention.linear_proj", h)
        out[dst + "attn.c_proj.weight"], out[dst + "attn.c_proj.bias"] = w.t(), b
        w, b = linear(src + "mlp.linear_fc1", ffn)
        out[dst + "mlp.c_fc.weight"], out[dst + "mlp.c_fc.bias"] = w.t(), b
        w, b = linear(src + "mlp.linear_fc2", h)
        out[dst + "mlp.c_proj.weight"], out[dst + "mlp.c_proj.bias"] = w.t(), b
    out["transformer.ln_f.weight"] = take("decoder.final_layernorm.weight")
    out["transformer.ln_f.bias"] = take("decoder.final_layernorm.bias")
    return out
