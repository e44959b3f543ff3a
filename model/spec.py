"""Assemble megatron-core layer specs: which core attention, norm and recompute each layer gets.

Pure wiring, no math: the math lives in ``model.attention``.
"""

from __future__ import annotations

import copy

import torch.utils.checkpoint
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    get_transformer_layer_offset,
)

from model.attention.first_values import FirstLayerValues
from model.attention.registry import core_attention_class
from model.model_config import ModelConfig
from model.norm import Norm
from model.pipeline_stages import layer_seed


class SeededTransformerLayer(TransformerLayer):
    """megatron-core's ``TransformerLayer``, initialised from its own stream: the seed of the
    run (``init_seed``) and the layer's global number. Every pipeline layout (each stage builds
    only its layers) and every TP size therefore builds the same master weights, and building a
    layer leaves the process's RNG where it was."""

    def __init__(self, config, submodules, layer_number: int = 1, *args, init_seed: int, **kw):
        global_number = layer_number + get_transformer_layer_offset(config, kw.get("vp_stage"))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(layer_seed(init_seed, global_number))
            super().__init__(config, submodules, layer_number, *args, **kw)


class RecomputedTransformerLayer(SeededTransformerLayer):
    """A transformer layer whose activations are recomputed in backward (full recompute).

    Uses torch's non-reentrant checkpoint, which restores the CPU (and CUDA) RNG state so dropout
    masks replay exactly; parameter names are those of ``TransformerLayer``. The recompute reads
    the first layer's values V¹ of *its own* forward: under a pipeline schedule the model's
    holder already holds a later micro-batch's V¹ when a backward runs.
    """

    def forward(self, *args, **kwargs):
        if not (self.training and torch.is_grad_enabled()):
            return super().forward(*args, **kwargs)
        holder = getattr(self.self_attention.core_attention, "first_values", None)
        if holder is None or self.layer_number == 1:
            return torch.utils.checkpoint.checkpoint(
                super().forward, *args, use_reentrant=False, **kwargs
            )
        values = holder.get()

        def replay(*a, **kw):
            holder.put(values)
            return TransformerLayer.forward(self, *a, **kw)

        return torch.utils.checkpoint.checkpoint(replay, *args, use_reentrant=False, **kwargs)


def layer_spec(
    cfg: ModelConfig,
    variant: str,
    first_values: FirstLayerValues | None = None,
    init_seed: int = 0,
) -> ModuleSpec:
    """megatron-core's local GPT layer with our core attention ``variant`` and norms, initialised
    from ``init_seed`` and its global layer number."""
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
    spec.module = RecomputedTransformerLayer if cfg.recompute == "full" else SeededTransformerLayer
    spec.params = {**spec.params, "init_seed": init_seed}
    return spec


def block_spec(
    cfg: ModelConfig,
    first_values: FirstLayerValues | None = None,
    init_seed: int = 0,
    layers: range | None = None,
) -> TransformerBlockSubmodules:
    """One spec per layer of ``layers`` (global indices; default all: a pipeline stage builds its
    own slice), variants may differ per layer, plus the final norm. Variants that read the first
    layer's values share ``first_values`` across all layers."""
    layers = range(cfg.num_layers) if layers is None else layers
    return TransformerBlockSubmodules(
        layer_specs=[
            layer_spec(cfg, cfg.variant_of_layer(i), first_values, init_seed) for i in layers
        ],
        layer_norm=Norm,
    )
