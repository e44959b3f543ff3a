"""Configuration of a twicing-lm GPT exported for Hugging Face ``transformers`` (remote code).

Written into the export directory by ``python -m pretrain.export_hf`` beside
``modeling_twicing.py``; ``config.json``'s ``auto_map`` points at both, so
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` loads the model without
twicing-lm installed. Self-contained: imports only ``transformers``.
"""

from __future__ import annotations

from transformers import PretrainedConfig

#: the attention variants ``modeling_twicing`` computes
VARIANTS = ("softmax", "twicing", "neutreno", "resformer", "svformer", "neural")
#: variants whose layers >= 1 read layer 0's values
FIRST_VALUE_VARIANTS = ("neutreno", "resformer", "svformer")


class TwicingLMConfig(PretrainedConfig):
    """A pre-norm GPT (megatron-core's layer) whose layers each use one attention variant.

    ``layer_variants[i]`` names layer ``i``'s attention (see ``VARIANTS``); ``attention_options``
    are the numeric options of the non-softmax variant (NeuTRENO ``lambda``, ResFormer
    ``lambda_first``/``lambda_own``, Neural Attention ``dim``). ``position_embedding`` is
    ``"rope"`` (rotate-half, ``rope_theta``; ``rope_scaling_type`` ``"linear"`` divides positions
    by ``rope_scaling_factor``, ``"llama3"`` is Llama 3.1's frequency scaling with low/high
    frequency factors 1 and 4 and an original context of 8192) or ``"learned_absolute"``;
    ``normalization`` ``"LayerNorm"`` or ``"RMSNorm"``; ``activation`` ``"gelu"`` (exact),
    ``"gelu_tanh"``, ``"relu"`` or ``"swiglu"``; ``linear_bias`` puts a bias on every linear layer,
    ``qkv_bias`` on the QKV projection only.
    """

    model_type = "twicing_lm"

    def __init__(
        self,
        vocab_size: int = 1024,
        hidden_size: int = 64,
        intermediate_size: int = 256,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 4,
        num_key_value_heads: int | None = None,
        max_position_embeddings: int = 64,
        position_embedding: str = "rope",
        rope_theta: float = 10000.0,
        rope_scaling_type: str = "none",
        rope_scaling_factor: float = 1.0,
        normalization: str = "LayerNorm",
        layer_norm_eps: float = 1e-5,
        activation: str = "gelu",
        linear_bias: bool = True,
        qkv_bias: bool = False,
        layer_variants: list[str] | None = None,
        attention_options: dict[str, float] | None = None,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        tie_word_embeddings: bool = True,
        **kwargs,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = hidden_size // num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.position_embedding = position_embedding
        self.rope_theta = rope_theta
        self.rope_scaling_type = rope_scaling_type
        self.rope_scaling_factor = rope_scaling_factor
        self.normalization = normalization
        self.layer_norm_eps = layer_norm_eps
        self.activation = activation
        self.linear_bias = linear_bias
        self.qkv_bias = qkv_bias
        self.layer_variants = list(layer_variants or ["softmax"] * num_hidden_layers)
        self.attention_options = dict(attention_options or {})
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        checks = {
            "position_embedding": (position_embedding, ("rope", "learned_absolute")),
            "normalization": (normalization, ("LayerNorm", "RMSNorm")),
            "activation": (activation, ("gelu", "gelu_tanh", "relu", "swiglu")),
            "rope_scaling_type": (rope_scaling_type, ("none", "linear", "llama3")),
        }
        for key, (value, known) in checks.items():
            if value not in known:
                raise ValueError(f"{key}={value!r} is not one of {known}")
        unknown = sorted(set(self.layer_variants) - set(VARIANTS))
        if unknown or len(self.layer_variants) != num_hidden_layers:
            raise ValueError(
                f"layer_variants must name one of {VARIANTS} per layer ({num_hidden_layers}), "
                f"got {self.layer_variants}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_key_value_heads={self.num_key_value_heads} does not divide "
                f"num_attention_heads={num_attention_heads}"
            )
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def uses_first_values(self) -> bool:
        return any(v in FIRST_VALUE_VARIANTS for v in self.layer_variants)
