"""twicing-lm model: megatron-core GPT with pluggable (Twicing) core attention."""

import warnings

# megatron-core announces at import that the optional CUDA extensions (Apex, Transformer Engine)
# are absent; the torch fallbacks it then uses are exactly what this project runs.
warnings.filterwarnings(
    "ignore", message=r".*(Apex|Transformer Engine)( and Apex)? (is|are) not installed"
)

from model.config import ModelConfig  # noqa: E402
from model.gpt import build_gpt, transformer_config  # noqa: E402

__all__ = ["ModelConfig", "build_gpt", "transformer_config"]
