"""Shared fixtures: where the shared data lives, and a one-rank megatron process group."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))  # tests/launch.py and friends

os.environ.setdefault("DS_ACCELERATOR", "cpu")
# This venv's tools first, as in an activated venv and in the Slurm jobs (slurm_jobs.job_env):
# DeepSpeed JIT-builds its CPU shm op with whichever `ninja` is on PATH, and the system's 1.11
# and the venv's 1.13 hash the build log differently, so mixing them rebuilt the op (~30 s of
# both cores) every time a test switched between the two.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def shared_dir() -> Path:
    """``../shared`` beside the checkout, or ``$TWICING_SHARED``."""
    return Path(os.environ.get("TWICING_SHARED", ROOT.parent / "shared")).resolve()


def need_shared(*parts: str) -> Path:
    """Path under the shared dir; skip (never under CI) when it is absent."""
    path = shared_dir().joinpath(*parts)
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing; CI must have ../shared (or set TWICING_SHARED)")
        pytest.skip(f"{path} is missing (set TWICING_SHARED to the shared/ directory)")
    return path


def need_module(name: str):
    """Import ``name`` (an extra the project installs: transformers, lm_eval, accelerate); skip
    when it is missing, except under CI, where a missing one fails."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as e:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed, but CI installs it (make install): {e}")
        pytest.skip(f"{name} is not installed (pip install -e '.[eval]')", allow_module_level=True)


#: what a rank's launcher exports; a command a test starts inherits os.environ
RENDEZVOUS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@pytest.fixture(autouse=True)
def _rendezvous_env():
    """Undo what an in-process test's ``distributed.init`` exports: a command started later with
    the inherited environment would otherwise rendezvous at this pytest process's own store's
    port (EADDRINUSE; CI failed the study test this way)."""
    saved = {k: os.environ.get(k) for k in RENDEZVOUS}
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def one_rank():
    """A single-process gloo group with megatron's parallel_state at TP=1."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from launch import free_port

    if not dist.is_initialized():  # no MASTER_PORT etc. in os.environ: see _rendezvous_env
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    from model import megatron_compat

    megatron_compat.install()  # what every command does at start-up
    yield


@pytest.fixture(scope="session")
def wikitext_manifest(tmp_path_factory) -> Path:
    """WikiText-2 from ../shared tokenized with a 1024-piece BPE (once per test session)."""
    from data_prep.prepare_wikitext import prepare_wikitext

    source = need_shared("data", "wikitext")
    out = tmp_path_factory.mktemp("wikitext2")
    return prepare_wikitext(out, name="wikitext-2", source=source, vocab_size=1024, progress=False)
