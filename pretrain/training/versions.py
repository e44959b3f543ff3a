"""Library versions recorded with every checkpoint."""

from __future__ import annotations

import platform
from importlib import metadata


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("torch", "megatron-core", "deepspeed", "sentencepiece", "twicing-lm"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out
