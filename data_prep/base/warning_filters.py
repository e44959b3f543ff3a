"""Keep the console ours: silence third-party warnings known to be harmless here, by message.

Only the exact messages below are filtered (each is a fact about this stack, not a problem):
anything else, including new warnings from the same libraries, stays visible.
"""

from __future__ import annotations

import logging
import warnings

#: message regexes of warnings that say nothing actionable for a twicing-lm user
KNOWN_HARMLESS = (
    # megatron-core: the optional CUDA extensions are absent; we use its torch fallbacks
    r".*(Apex|Transformer Engine)( and Apex)? (is|are) not installed",
    # megatron-core 0.16 warns on its own default cuda_graph_scope (we capture no CUDA graphs)
    r"full scope is deprecated\. Use empty cuda_graph_scope",
    # a CUDA tuning hint megatron-core prints on every rank, also on CPU
    r"When using async grad allreduce it is recommended to set the environment variable "
    r"CUDA_DEVICE_MAX_CONNECTIONS",
    # torch deprecations triggered inside DeepSpeed / megatron-core, not in our code
    r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor|_all_gather_base|"
    r"_reduce_scatter_base)` is deprecated",
)


def quiet_known_warnings() -> None:
    """Install the filters (idempotent) and keep DeepSpeed's logger at warnings and above."""
    for message in KNOWN_HARMLESS:
        warnings.filterwarnings("ignore", message=message)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
