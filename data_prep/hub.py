"""``datasets.load_dataset`` that fails fast, with a useful message, when the hub is unreachable.

Without network, ``load_dataset("Salesforce/wikitext", ...)`` retries for ~25 s before failing.
We probe the hub endpoint first (a 3 s TCP connect); when it is unreachable the call runs in
``datasets``' offline mode, which still finds a copy in the local ``datasets`` cache and otherwise
fails at once.
"""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

from data_prep.base.errors import DataPrepError

PROBE_TIMEOUT_S = 3.0
_HINT = (
    " The hub cannot be reached from here: pass a local copy instead (a directory in the hub's "
    "parquet layout, or one with the original files)."
)


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the Hugging Face endpoint opens within ``timeout``."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


@contextmanager
def _offline():
    """Switch ``datasets`` / ``huggingface_hub`` to offline mode for the duration."""
    import datasets.config
    import huggingface_hub.constants as hub_constants

    saved = datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


def load_dataset_split(
    path: str,
    config: str | None,
    split: str,
    *,
    streaming: bool = False,
    cache_dir: str | Path | None = None,
):
    """``datasets.load_dataset(path, config, split=split)``; a local ``path`` (a directory in the
    hub's layout) is loaded by the same call. Raises :class:`DataPrepError` when it cannot."""
    import datasets

    local = Path(path).exists()
    kwargs = {"split": split, "streaming": streaming}
    if cache_dir is not None:
        kwargs["cache_dir"] = str(cache_dir)
    offline = not local and not datasets.config.HF_HUB_OFFLINE and not hub_reachable()
    try:
        if offline:
            with _offline():
                return datasets.load_dataset(path, config, **kwargs)
        return datasets.load_dataset(path, config, **kwargs)
    except (ConnectionError, FileNotFoundError, OSError) as e:
        where = "the local directory" if local else "the Hugging Face hub (or the datasets cache)"
        hint = _HINT if not local else ""
        msg = f"cannot load {path!r} ({config}, {split}) from {where}: {e}.{hint}"
        raise DataPrepError(msg) from e
    except ValueError as e:  # unknown config / split
        raise DataPrepError(f"cannot load {path!r} ({config}, {split}): {e}") from e
