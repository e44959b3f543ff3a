"""A twicing-lm GPT as a Hugging Face ``transformers`` causal LM (remote code).

Written into the export directory by ``python -m pretrain.export_hf`` and loaded with
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``; self-contained (torch and
transformers only). It computes what twicing-lm's megatron-core model computes, layer by layer:

    h = embed(ids) [+ pos_embed(positions)]
    h = h + linear_proj(attention(norm1(h)));  h = h + mlp(norm2(h))   (per layer)
    logits = lm_head(final_norm(h))

with megatron's fused QKV rows per query group ``[q (heads/groups heads), k, v]``, rotate-half
RoPE on q and k (scaled as megatron-core scales it: linear position interpolation, or Llama
3.1's frequency scaling), and per layer one attention variant on
``A = softmax(q·kᵀ/√d + causal mask)`` (per head; keys and values are shared by a group of query
heads under GQA):

- ``softmax``: ``A V``;
- ``twicing``: ``(2A − A²) V = 2·o1 − A·o1`` with ``o1 = A V`` (the same A in both products);
- ``neutreno`` (layers ≥ 1): ``A V + λ (V⁰ − V)``, ``V⁰`` layer 0's values;
- ``resformer`` (layers ≥ 1): ``A (λ₁ V⁰ + λ₂ V)``; ``svformer``: ``A V⁰``;
- ``neural``: ``A`` is the softmax of a pairwise MLP score ``MLP([W_q q_i; W_k k_j])``
  (``2d′ → d′ → d′/2 → 1``, ReLU, no ``1/√d``).

Cache (``generate()``'s ``DynamicCache``): every layer caches K and V. A twicing layer also
caches its first-pass output O1 (query-head width) in the same cache layer, stored after V along
the head axis (``values = [V | O1]``), so beam reordering and cropping keep them aligned. With
causal ``A``, ``o1_j`` depends only on positions ``≤ j`` and never changes as tokens are
appended, so a step's output is ``2·o1_new − A_new·[O1_cached; o1_new]``: two attention reads,
no recompute. NeuTRENO/ResFormer/SVFormer layers read layer 0's V cache (``V⁰`` of every
position) instead of recomputing it. Left-padded batches: ``attention_mask`` hides padding keys
(a padding query keeps its own key, so no row is empty); positions count real tokens.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_twicing import FIRST_VALUE_VARIANTS, TwicingLMConfig

# transformers renamed the output's ``past_key_values`` to ``cache``; fill whichever exists
_CACHE_FIELD = next(
    name
    for name in ("cache", "past_key_values")
    if name in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
)

#: Neural Attention's per-head scorer weights: name -> shape after the head axis, from (d, d′)
NEURAL_SHAPES = {
    "wq": lambda d, e: (d, e),
    "wk": lambda d, e: (d, e),
    "w1q": lambda d, e: (e, e),
    "w1k": lambda d, e: (e, e),
    "b1": lambda d, e: (e,),
    "w2": lambda d, e: (e, e // 2),
    "b2": lambda d, e: (e // 2,),
    "w3": lambda d, e: (e // 2,),
}


def _norm(config: TwicingLMConfig) -> nn.Module:
    if config.normalization == "RMSNorm":
        return nn.RMSNorm(config.hidden_size, eps=config.layer_norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def llama3_scaled(inv_freq: torch.Tensor, factor: float) -> torch.Tensor:
    """Llama 3.1's RoPE frequency scaling, as megatron-core computes it (low/high frequency
    factors 1 and 4, original context 8192)."""
    low, high, context = 1.0, 4.0, 8192
    wavelen = 2 * torch.pi / inv_freq
    scaled = torch.where(wavelen > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < context / high) * ~(wavelen > context / low)
    return torch.where(medium, smoothed, scaled)


def rope(
    x: torch.Tensor, positions: torch.Tensor, theta: float, scaling: str = "none", factor=1.0
) -> torch.Tensor:
    """Rotate-half RoPE of ``x`` ``[b, s, heads, d]`` at ``positions`` ``[b, s]``; ``scaling``
    ``"linear"`` divides positions by ``factor``, ``"llama3"`` scales the frequencies."""
    d = x.size(-1)
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=x.device) / d))
    if scaling == "llama3":
        inv_freq = llama3_scaled(inv_freq, factor)
    positions = positions.to(torch.float32)
    if scaling == "linear":
        positions = positions * (1 / factor)
    freqs = positions[..., None] * inv_freq  # [b, s, d/2]
    angles = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
    return x * angles.cos().to(x.dtype) + _rotate_half(x) * angles.sin().to(x.dtype)


def _repeat(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[b, groups, s, d]`` → ``[b, heads, s, d]`` (query head h reads group h // rep)."""
    return x if x.size(1) == heads else x.repeat_interleave(heads // x.size(1), dim=1)


def _cached(cache, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The cached ``(keys, values)`` of ``layer`` before this step, or None when empty."""
    layers = getattr(cache, "layers", None)
    if cache is None or layers is None or layer >= len(layers):
        return None
    entry = layers[layer]
    keys = getattr(entry, "keys", None)
    if not getattr(entry, "is_initialized", False) or keys is None or keys.numel() == 0:
        return None
    return keys, entry.values


def key_mask(
    attention_mask: torch.Tensor | None, batch: int, s_q: int, past: int, device
) -> torch.Tensor:
    """Bool ``[b or 1, 1, s_q, past + s_q]``, True = may attend: causal, minus padding keys."""
    s_k = past + s_q
    i = torch.arange(past, s_k, device=device)[:, None]
    j = torch.arange(s_k, device=device)[None, :]
    allowed = j <= i
    if attention_mask is None:
        return allowed[None, None]
    if attention_mask.dim() != 2 or attention_mask.size(-1) < s_k:
        raise ValueError(
            f"attention_mask must be 2-D [batch, past + new] (>= {s_k} positions), got "
            f"{tuple(attention_mask.shape)}"
        )
    keep = attention_mask[:, -s_k:].to(torch.bool)[:, None, :]  # [b, 1, s_k]
    return ((allowed & keep) | (j == i))[:, None]


class TwicingAttention(nn.Module):
    """One layer's attention: fused QKV, RoPE, the layer's variant, output projection."""

    def __init__(self, config: TwicingLMConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.variant = config.layer_variants[layer_idx]
        self.heads, self.groups = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        self.rope_theta = config.rope_theta if config.position_embedding == "rope" else None
        self.rope_scaling = (config.rope_scaling_type, config.rope_scaling_factor)
        self.options = config.attention_options
        width = (self.heads + 2 * self.groups) * self.head_dim
        qkv_bias = config.linear_bias or config.qkv_bias
        self.linear_qkv = nn.Linear(config.hidden_size, width, bias=qkv_bias)
        self.linear_proj = nn.Linear(
            self.heads * self.head_dim, config.hidden_size, bias=config.linear_bias
        )
        if self.variant == "neural":
            dim = int(self.options.get("dim", 0)) or max(2, self.head_dim // 32)
            for name, shape in NEURAL_SHAPES.items():
                param = nn.Parameter(torch.zeros(self.heads, *shape(self.head_dim, dim)))
                self.register_parameter(name, param)

    def scores(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Unmasked scores ``[b, h, s_q, s_k]`` (``q`` ``[b, h, s_q, d]``, ``k`` at head width)."""
        if self.variant != "neural":
            return torch.matmul(q, k.transpose(-1, -2)) * self.scale
        qp = torch.einsum("bhsd,hde->bhse", q, self.wq)
        kp = torch.einsum("bhsd,hde->bhse", k, self.wk)
        a = torch.einsum("bhse,hef->bhsf", qp, self.w1q)
        c = torch.einsum("bhse,hef->bhsf", kp, self.w1k)
        hidden = F.relu(a[:, :, :, None] + c[:, :, None] + self.b1[None, :, None, None])
        hidden = F.relu(torch.einsum("bhijf,hfg->bhijg", hidden, self.w2) + self.b2[:, None, None])
        return torch.einsum("bhijg,hg->bhij", hidden, self.w3)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        cache,
        v_first: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Output ``[b, s, hidden]`` and this layer's values of every position so far."""
        b, s, _ = x.shape
        h, g, d = self.heads, self.groups, self.head_dim
        q, k, v = self.linear_qkv(x).view(b, s, g, -1).split([h // g * d, d, d], dim=-1)
        q = q.reshape(b, s, h, d)
        if self.rope_theta is not None:
            q = rope(q, positions, self.rope_theta, *self.rope_scaling)
            k = rope(k, positions, self.rope_theta, *self.rope_scaling)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [b, heads or groups, s, d]
        o1_past = None
        if self.variant == "twicing":  # the cache layer holds [V | O1] along the head axis
            past = _cached(cache, self.layer_idx)
            k_all = k if past is None else torch.cat((past[0], k), dim=2)
            v_all = v if past is None else torch.cat((past[1][:, :g], v), dim=2)
            o1_past = None if past is None else past[1][:, g:]
        elif cache is not None:
            k_all, v_all = cache.update(k, v, self.layer_idx)
        else:
            k_all, v_all = k, v
        weights = self.scores(q, _repeat(k_all, h)).masked_fill(~mask, float("-inf"))
        weights = weights.float().softmax(dim=-1).to(q.dtype)
        out, o1 = self.mix(weights, v_all, v_first, s, o1_past)
        if o1 is not None and cache is not None:
            cache.update(k, torch.cat((v, o1), dim=1), self.layer_idx)
        out = out.transpose(1, 2).reshape(b, s, h * d)
        return self.linear_proj(out), v_all

    def mix(self, weights, v_all, v_first, s: int, o1_past):
        """``(output [b, h, s, d], the new o1 for twicing else None)`` from ``A``."""
        h, variant = self.heads, self.variant
        if variant in FIRST_VALUE_VARIANTS and v_first is None:
            raise ValueError(f"{variant} layer {self.layer_idx} needs layer 0's values")
        if variant == "twicing":
            o1 = torch.matmul(weights, _repeat(v_all, h))
            o1_all = o1 if o1_past is None else torch.cat((o1_past, o1), dim=2)
            return 2 * o1 - torch.matmul(weights, o1_all), o1
        if variant == "neutreno":
            own = _repeat(v_first[:, :, -s:], h) - _repeat(v_all[:, :, -s:], h)
            out = torch.matmul(weights, _repeat(v_all, h)) + self.options["lambda"] * own
            return out, None
        if variant == "resformer":
            mixed = self.options["lambda_first"] * v_first + self.options["lambda_own"] * v_all
            return torch.matmul(weights, _repeat(mixed, h)), None
        if variant == "svformer":
            return torch.matmul(weights, _repeat(v_first, h)), None
        return torch.matmul(weights, _repeat(v_all, h)), None


class TwicingMLP(nn.Module):
    def __init__(self, config: TwicingLMConfig) -> None:
        super().__init__()
        ffn = config.intermediate_size
        glu = config.activation == "swiglu"
        self.activation = config.activation
        self.linear_fc1 = nn.Linear(config.hidden_size, 2 * ffn if glu else ffn, config.linear_bias)
        self.linear_fc2 = nn.Linear(ffn, config.hidden_size, bias=config.linear_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear_fc1(x)
        if self.activation == "swiglu":
            gate, up = x.chunk(2, dim=-1)
            x = F.silu(gate) * up
        elif self.activation == "gelu_tanh":
            x = F.gelu(x, approximate="tanh")
        else:
            x = F.gelu(x) if self.activation == "gelu" else F.relu(x)
        return self.linear_fc2(x)


class TwicingDecoderLayer(nn.Module):
    def __init__(self, config: TwicingLMConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = _norm(config)
        self.self_attn = TwicingAttention(config, layer_idx)
        self.post_attention_layernorm = _norm(config)
        self.mlp = TwicingMLP(config)

    def forward(self, h, positions, mask, cache, v_first):
        attn, values = self.self_attn(self.input_layernorm(h), positions, mask, cache, v_first)
        h = h + attn
        return h + self.mlp(self.post_attention_layernorm(h)), values


class TwicingPreTrainedModel(PreTrainedModel):
    config_class = TwicingLMConfig
    base_model_prefix = "model"
    _no_split_modules = ["TwicingDecoderLayer"]

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, TwicingAttention) and module.variant == "neural":
            for name in NEURAL_SHAPES:
                param = getattr(module, name)
                nn.init.zeros_(param) if name.startswith("b") else nn.init.normal_(param, std=std)


class TwicingModel(TwicingPreTrainedModel):
    """Embeddings, decoder layers and the final norm (hidden states out)."""

    def __init__(self, config: TwicingLMConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        if config.position_embedding == "learned_absolute":
            self.position_embeddings = nn.Embedding(
                config.max_position_embeddings, config.hidden_size
            )
        self.layers = nn.ModuleList(
            TwicingDecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = _norm(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None):
        b, s = input_ids.shape
        if cache is not None and getattr(cache, "is_compileable", False):
            raise ValueError(
                "twicing-lm remote code decodes with transformers' DynamicCache (the default); "
                f"got {type(cache).__name__}"
            )
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -s:]
            else:
                position_ids = torch.arange(past, past + s, device=input_ids.device).expand(b, s)
        h = self.embed_tokens(input_ids)
        if self.config.position_embedding == "learned_absolute":
            h = h + self.position_embeddings(position_ids)
        mask = key_mask(attention_mask, b, s, past, input_ids.device)
        v_first = None
        for i, layer in enumerate(self.layers):
            h, values = layer(h, position_ids, mask, cache, v_first if i > 0 else None)
            if i == 0 and self.config.uses_first_values:
                v_first = values  # layer 0's values of every position (its V cache)
        return self.norm(h)


class TwicingForCausalLM(TwicingPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: TwicingLMConfig) -> None:
        super().__init__(config)
        self.model = TwicingModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values=None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        if input_ids is None:
            raise ValueError("twicing-lm remote code takes input_ids (no inputs_embeds)")
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if not use_cache:
            cache = None
        elif cache is None:
            cache = DynamicCache()
        h = self.model(input_ids, attention_mask, position_ids, cache)
        if isinstance(logits_to_keep, int):
            h = h[:, -logits_to_keep:] if logits_to_keep else h
        else:  # positions to keep
            h = h[:, logits_to_keep]
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})
