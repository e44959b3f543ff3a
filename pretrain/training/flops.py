"""Model FLOPs per token (forward + backward), for TFLOP/s and MFU."""

from __future__ import annotations

from model import ModelConfig
from model.attention.registry import variant

#: dense bf16 peak TFLOP/s per device, for MFU when the device is recognised
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def flops_per_token(cfg: ModelConfig) -> float:
    """Training FLOPs per token: 3 × forward, recompute not counted (model FLOPs).

    Forward per layer: 2 × (matmul weights) plus attention scores and weighted sum over on average
    ``seq/2`` keys (causal), times the variant's ``attention_passes`` (twicing: 2).
    """
    h, s = cfg.hidden_size, cfg.seq_length
    kv = cfg.query_groups * cfg.head_dim
    ffn = cfg.ffn_hidden_size or 4 * h
    fc1 = ffn * (2 if cfg.activation == "swiglu" else 1)
    layer_weights = h * (h + 2 * kv) + h * h + h * fc1 + ffn * h
    forward = 2 * cfg.num_layers * layer_weights + 2 * h * cfg.padded_vocab_size
    for i in range(cfg.num_layers):
        passes = variant(cfg.variant_of_layer(i)).attention_passes
        forward += passes * 2 * 2 * (s / 2) * h  # QKᵀ and A·V, causal half
    return 3.0 * forward


def peak_tflops(configured: float | None) -> float | None:
    """Configured peak, else a known GPU's bf16 peak, else None (no MFU on CPU)."""
    if configured:
        return configured
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, value in PEAK_TFLOPS.items():
            if key in name:
                return value
    return None
