"""torch's weights-only refusal of a pickle, told as one line naming the file (exit 4).

A ``pytorch_model.bin`` (or any ``torch.load`` input) that holds more than tensors is refused by
``torch.load(weights_only=True)`` before anything in it runs; :func:`refused_global` finds that
refusal in an exception chain and :func:`unsafe_pickle_error` says what to do about it.
"""

from __future__ import annotations

import pickle
from pathlib import Path

from data_prep.base.errors import CheckpointError


def refused_global(error: BaseException | None) -> str | None:
    """The refused global when ``error`` (or what caused it) is torch's weights-only refusal."""
    while error is not None:
        if isinstance(error, pickle.UnpicklingError) or "Weights only load failed" in str(error):
            called = [ln.strip() for ln in str(error).splitlines() if "GLOBAL" in ln]
            return called[0].split(" was not")[0] if called else "not a weights-only file"
        error = error.__cause__ or error.__context__
    return None


def unsafe_pickle_error(path: Path, called: str) -> CheckpointError:
    """The refusal of ``path``, with the one-off conversion for a file the user trusts."""
    safetensors = path.with_name("model.safetensors")
    return CheckpointError(
        f"{path}: refused as unsafe to unpickle ({called}): it holds more than tensors, so "
        "loading it could run code; nothing in it was run. If you trust it, convert it once to "
        'safetensors and load that instead: python -c "import torch; from safetensors.torch '
        f"import save_file; save_file(torch.load('{path}', weights_only=False), "
        f"'{safetensors}')\" and remove the .bin file"
    )
