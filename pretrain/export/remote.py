"""Weight adapter: any twicing-lm GPT (every attention variant, per layer) as custom
``transformers`` code (``remote_code/``), loaded with ``trust_remote_code=True``.

The modeling files are copied into the export and named by ``config.json``'s ``auto_map``; they
import neither twicing-lm nor megatron. Parameter names mirror megatron-core's (fused QKV kept in
its per-group layout), so the conversion is a rename.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from model import ModelConfig

Take = Callable[[str], torch.Tensor]

CODE_DIR = Path(__file__).parent / "remote_code"
CODE_FILES = ("configuration_twicing.py", "modeling_twicing.py")
AUTO_MAP = {
    "AutoConfig": "configuration_twicing.TwicingLMConfig",
    "AutoModelForCausalLM": "modeling_twicing.TwicingForCausalLM",
}
#: the variants the custom code computes (a new registry variant must be added there first)
SUPPORTED = ("softmax", "twicing", "neutreno", "resformer", "svformer", "neural")


def unsupported(cfg: ModelConfig) -> str | None:
    """Why the custom code cannot export ``cfg``, or None."""
    for i in range(cfg.num_layers):
        variant = cfg.variant_of_layer(i)
        if variant not in SUPPORTED:
            return (
                f"layer {i} uses {variant!r} attention, which the exported modeling code does "
                f"not implement (it computes {', '.join(SUPPORTED)})"
            )
    return None


def hf_config(cfg: ModelConfig, special: dict, dtype: torch.dtype):
    """The ``TwicingLMConfig`` of ``cfg`` (``special``: bos/eos/pad token ids)."""
    from pretrain.export.remote_code.configuration_twicing import TwicingLMConfig

    options = dict(cfg.attention_options)
    if cfg.attention == "neural":
        options["dim"] = float(int(options.get("dim", 0)) or max(2, cfg.head_dim // 32))
    return TwicingLMConfig(
        vocab_size=cfg.padded_vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size or 4 * cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.query_groups,
        max_position_embeddings=cfg.seq_length,
        position_embedding=cfg.position_embedding,
        rope_theta=float(cfg.rotary_base),
        normalization=cfg.normalization,
        layer_norm_eps=cfg.layernorm_epsilon,
        activation=cfg.activation,
        linear_bias=cfg.add_bias_linear,
        layer_variants=[cfg.variant_of_layer(i) for i in range(cfg.num_layers)],
        attention_options=options,
        attention=cfg.attention,
        attention_layers=cfg.attention_layers,
        tie_word_embeddings=cfg.tied_embeddings,
        architectures=["TwicingForCausalLM"],
        auto_map=dict(AUTO_MAP),
        dtype=dtype,
        **special,
    )


def model_class():
    from pretrain.export.remote_code.modeling_twicing import TwicingForCausalLM

    return TwicingForCausalLM


def convert(cfg: ModelConfig, take: Take) -> dict[str, torch.Tensor]:
    """The custom model's parameters from our TP=1 weights (``take(name)`` pops one of ours)."""
    from pretrain.export.remote_code.modeling_twicing import NEURAL_SHAPES

    out = {"model.embed_tokens.weight": take("embedding.word_embeddings.weight")}
    if cfg.position_embedding == "learned_absolute":
        out["model.position_embeddings.weight"] = take("embedding.position_embeddings.weight")
    norm = ("weight",) if cfg.normalization == "RMSNorm" else ("weight", "bias")
    linear = ("weight", "bias") if cfg.add_bias_linear else ("weight",)
    for i in range(cfg.num_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        names = [(f"input_layernorm.{p}", f"input_layernorm.{p}") for p in norm]
        names += [(f"pre_mlp_layernorm.{p}", f"post_attention_layernorm.{p}") for p in norm]
        for ours, theirs in (
            ("self_attention.linear_qkv", "self_attn.linear_qkv"),
            ("self_attention.linear_proj", "self_attn.linear_proj"),
            ("mlp.linear_fc1", "mlp.linear_fc1"),
            ("mlp.linear_fc2", "mlp.linear_fc2"),
        ):
            names += [(f"{ours}.{p}", f"{theirs}.{p}") for p in linear]
        if cfg.variant_of_layer(i) == "neural":
            core = "self_attention.core_attention"
            names += [(f"{core}.{n}", f"self_attn.{n}") for n in NEURAL_SHAPES]
        out |= {dst + theirs: take(src + ours) for ours, theirs in names}
    out |= {f"model.norm.{p}": take(f"decoder.final_layernorm.{p}") for p in norm}
    return out


def write_code(out: Path) -> None:
    """Copy the modeling code beside ``config.json`` (what ``auto_map`` names)."""
    for name in CODE_FILES:
        shutil.copy2(CODE_DIR / name, out / name)
