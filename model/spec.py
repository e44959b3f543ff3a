"""Assemble megatron-core layer specs: which core attention, norm and recompute each layer gets.

Pure wiring, no math: the math lives in ``model.attention``.
"""

from __future__ import annotations

import copy

import torch.utils.checkpoint
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import TransformerLayer

from model.attention.first_values import FirstLayerValues
from model.attention.registry import core_attention_class
from model.config import ModelConfig
from model.norm import Norm


class RecomputedTransformerLayer(TransformerLayer):
    """A transformer layer whose activations are recomputed in backward (full recompute).

    Uses torch's non-reentrant checkpoint, which restores the CPU (and CUDA) RNG state so dropout
    masks replay exactly; parameter names are those of ``TransformerLayer``.
    """

    def forward(self, *args, **kwargs):
        if self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(
                super().forward, *args, use_reentrant=False, **kwargs
            )
        return super().forward(*args, **kwargs)


def layer_spec(
    cfg: ModelConfig, variant: str, first_values: FirstLayerValues | None = None
) -> ModuleSpec:
    """megatron-core's local GPT layer with our core attention ``variant`` and norms."""
    spec = copy.deepcopy(get_gpt_layer_local_spec())
    sub = spec.submodules
    params = {
        "backend": cfg.attention_backend,
        "recompute": cfg.recompute == "selective",
        "first_values": first_values,
    }
    if variant == cfg.attention:
        params["options"] = cfg.attention_options
    sub.self_attention.submodules.core_attention = ModuleSpec(
        module=core_attention_class(variant), params=params
    )
    sub.input_layernorm = Norm
    sub.pre_mlp_layernorm = Norm
    if cfg.recompute == "full":
        spec.module = RecomputedTransformerLayer
    return spec


def block_spec(
    cfg: ModelConfig, first_values: FirstLayerValues | None = None
) -> TransformerBlockSubmodules:
    """One spec per layer (variants may differ per layer) plus the final norm. Variants that read
    the first layer's values share ``first_values`` across all layers."""
    return TransformerBlockSubmodules(
        layer_specs=[
            layer_spec(cfg, cfg.variant_of_layer(i), first_values) for i in range(cfg.num_layers)
        ],
        layer_norm=Norm,
    )
