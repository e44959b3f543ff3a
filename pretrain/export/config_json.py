"""A Hugging Face ``config.json`` as an import reads it: typed values, and refusals that name
the file and the key (``ConfigError``, exit 2). Torch-free.

RoPE comes in two spellings: transformers ≥ 5 writes ``rope_parameters`` (``rope_type``,
``rope_theta``, ``factor``, …); earlier releases wrote ``rope_theta`` and ``rope_scaling``
(``type`` or ``rope_type``). :meth:`ConfigJson.rope` reads either.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NoReturn

from data_prep.base.errors import ConfigError

_MISSING = object()
#: megatron-core 0.16.1's Llama 3.1 RoPE scaling constants (``RotaryEmbedding._apply_scaling``)
LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}  # fmt: skip


class ConfigJson:
    """The dict of ``path`` with reads that refuse what an import cannot take."""

    def __init__(self, data: dict[str, Any], path: Path) -> None:
        self.data, self.path = data, path

    @classmethod
    def read(cls, model_dir: Path) -> ConfigJson:
        path = model_dir / "config.json"
        if not path.is_file():
            what = "does not exist" if not model_dir.exists() else "has no config.json"
            raise ConfigError(
                f"--hf-model {model_dir} {what}: expected a Hugging Face model directory "
                "(config.json, model.safetensors or pytorch_model.bin, the tokenizer)"
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
        return cls(data, path)

    def refuse(self, key: str, why: str) -> NoReturn:
        value = self.data.get(key, "(absent)")
        raise ConfigError(f"{self.path}: key {key!r} = {value!r}: {why}")

    def get(self, key: str, default: Any = None) -> Any:
        value = self.data.get(key)
        return default if value is None else value

    def integer(self, key: str, default: Any = _MISSING) -> int:
        value = self.data.get(key)
        if value is None and default is not _MISSING:
            return default
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            self.refuse(key, "expected an integer > 0")
        return value

    def number(self, key: str, default: float) -> float:
        value = self.data.get(key)
        if value is None:
            return default
        if not isinstance(value, int | float) or isinstance(value, bool):
            self.refuse(key, "expected a number")
        return float(value)

    def flag(self, key: str, default: bool) -> bool:
        value = self.data.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            self.refuse(key, "expected true or false")
        return value

    def expect(self, key: str, allowed: tuple[Any, ...], why: str, default: Any = None) -> Any:
        """The value of ``key`` (``default`` when absent) if it is one of ``allowed``."""
        value = self.get(key, default)
        if value not in allowed:
            self.refuse(key, why)
        return value

    # ------------------------------------------------------------------ rope
    def rope(self) -> dict[str, Any]:
        """``ModelConfig``'s ``rotary_base``, ``rope_scaling``, ``rope_scaling_factor``; refuses
        the RoPE variants megatron-core does not compute exactly."""
        key = "rope_parameters" if isinstance(self.data.get("rope_parameters"), dict) else None
        params = dict(self.data.get(key) or {}) if key else {}
        if key is None:
            key = "rope_scaling"
            params = dict(self.data.get("rope_scaling") or {})
            if "rope_theta" in self.data:
                params["rope_theta"] = self.data["rope_theta"]
        kind = params.get("rope_type", params.get("type", "default"))
        theta = params.get("rope_theta", 10000.0)
        if not isinstance(theta, int | float) or theta <= 0 or float(theta) != int(theta):
            self._refuse_rope(key, f"rope_theta={theta!r}: twicing-lm's rotary_base is an integer")
        fields = {"rotary_base": int(theta), "rope_scaling": "none", "rope_scaling_factor": 1.0}
        if kind == "default":
            return fields
        factor = params.get("factor")
        if not isinstance(factor, int | float) or factor <= 0:
            self._refuse_rope(key, f"rope_type {kind!r} needs a factor > 0, got {factor!r}")
        if kind == "linear":
            return fields | {"rope_scaling": "linear", "rope_scaling_factor": float(factor)}
        if kind == "llama3":
            for name, fixed in LLAMA3_FIXED.items():
                if float(params.get(name, fixed)) != fixed:
                    self._refuse_rope(
                        key,
                        f"{name}={params.get(name)!r}: megatron-core 0.16.1 computes Llama 3 "
                        f"RoPE scaling only with {name}={fixed:g}",
                    )
            return fields | {"rope_scaling": "llama3", "rope_scaling_factor": float(factor)}
        self._refuse_rope(
            key,
            f"rope_type {kind!r} is not computed exactly here (supported: default, linear, llama3)",
        )

    def _refuse_rope(self, key: str, why: str) -> NoReturn:
        raise ConfigError(f"{self.path}: key {key!r}: {why}")
