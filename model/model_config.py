"""The GPT architecture, as a validated dataclass."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from data_prep.base.errors import ConfigError
from data_prep.base.strict_config import check
from model.attention.layer_selection import select_layers
from model.attention.registry import BACKENDS, VARIANTS, Backend


@dataclass
class ModelConfig:
    """A megatron-core GPT. ``attention`` is used in ``attention_layers``; other layers use softmax.

    ``attention_layers`` is ``"all"``, ``"none"``, ``"first:K"``, ``"last:K"`` or a list of 0-based
    layer indices. ``recompute``: ``"none"``, ``"selective"`` (core attention only) or ``"full"``
    (whole transformer layers). ``qkv_bias``: a bias on the QKV projection only (Qwen2; implied
    by ``add_bias_linear``). ``rope_scaling``: ``"linear"`` divides positions by
    ``rope_scaling_factor``; ``"llama3"`` is Llama 3.1's frequency scaling (megatron-core fixes
    its other parameters: low/high frequency factors 1 and 4, original context 8192).
    ``activation`` ``"gelu_tanh"`` is GELU's tanh approximation (GPT-2's ``gelu_new``).
    """

    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: int | None = None
    ffn_hidden_size: int | None = None
    vocab_size: int = 1024
    vocab_pad_multiple: int = 128
    seq_length: int = 64
    position_embedding: Literal["rope", "learned_absolute"] = "rope"
    rotary_base: int = 10000
    rope_scaling: Literal["none", "linear", "llama3"] = "none"
    rope_scaling_factor: float = 1.0
    normalization: Literal["LayerNorm", "RMSNorm"] = "LayerNorm"
    layernorm_epsilon: float = 1e-5
    activation: Literal["gelu", "gelu_tanh", "relu", "swiglu"] = "gelu"
    add_bias_linear: bool = True
    qkv_bias: bool = False
    tied_embeddings: bool = True
    attention: str = "twicing"
    attention_layers: str | list[int] = "all"
    attention_backend: Backend = "auto"  # auto|flash|sdpa|cudnn|sdpa-flash|efficient|flash4
    attention_options: dict[str, float] = field(default_factory=dict)
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    init_std: float = 0.02
    recompute: Literal["none", "selective", "full"] = "none"

    def __post_init__(self) -> None:
        for key in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "seq_length"):
            check(getattr(self, key) > 0, f"model.{key}", f"must be > 0, got {getattr(self, key)}")
        for key in ("ffn_hidden_size", "num_query_groups"):
            value = getattr(self, key)
            check(value is None or value > 0, f"model.{key}", f"must be > 0 (or null), got {value}")
        check(self.rotary_base > 0, "model.rotary_base", f"must be > 0, got {self.rotary_base}")
        self._check_rope_scaling()
        check(
            self.layernorm_epsilon > 0,
            "model.layernorm_epsilon",
            f"must be > 0, got {self.layernorm_epsilon}",
        )
        check(
            self.hidden_size % self.num_attention_heads == 0,
            "model.num_attention_heads",
            f"hidden_size {self.hidden_size} is not divisible by {self.num_attention_heads} heads",
        )
        groups = self.query_groups
        check(
            groups > 0 and self.num_attention_heads % groups == 0,
            "model.num_query_groups",
            f"{groups} does not divide num_attention_heads={self.num_attention_heads}",
        )
        check(
            self.attention in VARIANTS,
            "model.attention",
            f"unknown attention variant {self.attention!r}; known: {sorted(VARIANTS)}",
        )
        check(
            self.attention_backend in BACKENDS,
            "model.attention_backend",
            f"unknown backend {self.attention_backend!r}; known: {list(BACKENDS)}",
        )
        for key in ("attention_dropout", "hidden_dropout"):
            value = getattr(self, key)
            check(0.0 <= value < 1.0, f"model.{key}", f"must be in [0, 1), got {value}")
        try:
            layers = select_layers(self.attention_layers, self.num_layers)
        except ValueError as e:
            raise ConfigError(f"config key 'model.attention_layers': {e}") from None
        variant = VARIANTS[self.attention]
        try:
            self.attention_options = variant.check_options(self.attention_options)
        except ValueError as e:
            raise ConfigError(f"config key 'model.attention_options': {e}") from None
        if variant.uses_first_values:
            check(
                bool(layers - {0}),
                "model.attention_layers",
                f"{self.attention} mixes the first layer's values into layers >= 1, but "
                f"{self.attention_layers!r} with num_layers={self.num_layers} selects none of them",
            )
        check(
            variant.supports_flash or self.attention_backend in ("auto", "sdpa"),
            "model.attention_backend",
            f"'{self.attention_backend}' cannot run {self.attention} attention (scores are not "
            "q·kᵀ): use auto/sdpa",
        )
        layers = frozenset(i for i in layers if self.variant_of_layer(i) != "softmax")
        if self.attention_dropout > 0:
            for i in layers:
                check(
                    VARIANTS[self.attention].supports_dropout,
                    "model.attention_dropout",
                    f"{self.attention} attention (layer {i}) needs attention_dropout == 0, got "
                    f"{self.attention_dropout}: its two passes would draw different dropout masks",
                )
        check(self.vocab_pad_multiple > 0, "model.vocab_pad_multiple", "must be > 0")
        check(self.init_std > 0, "model.init_std", f"must be > 0, got {self.init_std}")

    def _check_rope_scaling(self) -> None:
        factor = self.rope_scaling_factor
        check(
            math.isfinite(factor) and factor > 0,
            "model.rope_scaling_factor",
            f"must be a finite number > 0, got {factor}",
        )
        if self.rope_scaling == "none":
            check(
                factor == 1.0,
                "model.rope_scaling_factor",
                f"is {factor}, but model.rope_scaling is 'none' (set linear or llama3)",
            )
        else:
            check(
                self.position_embedding == "rope",
                "model.rope_scaling",
                f"{self.rope_scaling!r} scales RoPE, but position_embedding is "
                f"{self.position_embedding!r}",
            )

    @property
    def padded_vocab_size(self) -> int:
        """Embedding rows: vocabulary rounded up to ``vocab_pad_multiple`` (same for every TP)."""
        m = self.vocab_pad_multiple
        return -(-self.vocab_size // m) * m

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def variant_of_layer(self, index: int) -> str:
        """Attention variant of 0-based layer ``index`` (layer 0 is plain softmax for variants
        that mix the first layer's values into the others)."""
        chosen = select_layers(self.attention_layers, self.num_layers)
        if index == 0 and VARIANTS[self.attention].uses_first_values:
            return "softmax"
        return self.attention if index in chosen else "softmax"

    @property
    def uses_first_values(self) -> bool:
        return VARIANTS[self.attention].uses_first_values

    def check_pipeline_parallel(self, pp: int) -> None:
        """Raise ``ConfigError`` unless the layers split evenly over ``pp`` pipeline stages."""
        check(
            self.num_layers % pp == 0,
            "model.num_layers",
            f"{self.num_layers} layers are not divisible by pipeline-parallel size {pp}",
        )

    def check_context_parallel(self, cp: int, mode: str, tp: int = 1) -> None:
        """Raise ``ConfigError`` unless a sample's sequence splits over ``cp`` ranks: into ``2·cp``
        equal chunks (each rank holds two, for causal load balance, in both modes), and, for
        ``ulysses``, this TP rank's heads and key/value groups divide by ``cp``."""
        if cp == 1:
            return
        check(
            self.seq_length % (2 * cp) == 0,
            "model.seq_length",
            f"{self.seq_length} is not divisible by 2 × parallel.context = {2 * cp} (each "
            "context-parallel rank holds two equal chunks of every sequence)",
        )
        if mode == "ulysses":
            heads, groups = self.num_attention_heads // tp, self.query_groups // tp
            check(
                heads % cp == 0 and groups % cp == 0,
                "parallel.context_mode",
                f"ulysses splits each TP rank's {heads} query heads and {groups} key/value "
                f"groups over {cp} context-parallel ranks: both must be divisible by "
                f"parallel.context={cp}; use parallel.context_mode=allgather (any head count)",
            )

    def check_tensor_parallel(self, tp: int) -> None:
        """Raise ``ConfigError`` unless heads and query groups split evenly over ``tp`` ranks."""
        check(
            self.num_attention_heads % tp == 0,
            "model.num_attention_heads",
            f"{self.num_attention_heads} heads are not divisible by tensor-parallel size {tp}",
        )
        check(
            self.query_groups % tp == 0,
            "model.num_query_groups",
            f"{self.query_groups} query groups are not divisible by tensor-parallel size {tp}",
        )
        ffn = self.ffn_hidden_size or 4 * self.hidden_size
        check(ffn % tp == 0, "model.ffn_hidden_size", f"{ffn} is not divisible by TP size {tp}")
        check(
            self.padded_vocab_size % tp == 0,
            "model.vocab_pad_multiple",
            f"padded vocabulary {self.padded_vocab_size} is not divisible by TP size {tp}",
        )
