"""Every place the project leans on megatron-core 0.16 internals, or on the torch internals that
running megatron-core on a CPU-only torch forces on us, in one module.

``tests/unit/test_megatron_compat.py`` checks each assumption against the installed megatron-core
and torch, so an upgrade that changes one fails there, loudly, instead of silently re-opening a
hole (the same contract as ``pretrain/parallel/deepspeed_compat.py`` for DeepSpeed).

Process-wide patches, installed once at process start-up by :func:`install` (called by
``pretrain.parallel.distributed.init``, which every command runs first; no-ops when CUDA is
available):

* ``torch.cuda.current_device`` returns the CPU device: megatron-core allocates RoPE
  frequencies and the sequence-parallel gather/scatter buffers with
  ``device=torch.cuda.current_device()``, which raises on a CPU-only torch.
* ``megatron.core.pipeline_parallel.schedules.torch`` is a proxy of ``torch`` whose ``zeros``
  maps ``device="cuda"`` to the CPU: the pipeline schedules allocate a token counter on "cuda".
* ``rotary_pos_embedding.get_pos_emb_on_this_cp_rank`` (the RoPE slice of a context-parallel
  rank: chunks ``r`` and ``2C−1−r``) builds its index tensor with ``pin_memory=True`` and
  ``.cuda()``: the same selection with a CPU index on a CPU-only torch.
* megatron's model-parallel RNG tracker (``tensor_parallel.random._CUDA_RNG_STATE_TRACKER`` and
  ``_CUDA_RNG_STATE_TRACKER_INITIALIZED``) is replaced by :class:`CpuRngTracker` by
  :func:`install_cpu_rng_tracker` (``pretrain.parallel.rng`` calls it when it seeds a run).

Scoped ones:

* :func:`tensor_cuda_is_identity`: ``Tensor.cuda()`` returns the tensor itself inside the block
  (megatron's tied-embedding set-up at pipeline size > 1 moves the weight with it).
* :class:`OffsetModuleList` overrides torch's private ``ModuleList._get_abs_string_index`` so a
  pipeline stage's layers carry their global names while indexing stays local.
* :func:`wrap_set_input_tensor` wraps a model's ``set_input_tensor``, the method megatron's
  schedules call with the tensor received from the previous stage.
* :func:`is_sequence_parallel` reads the ``sequence_parallel`` attribute megatron puts on the
  parameters whose gradients are partial per TP rank under sequence parallelism.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable

import torch

_installed = False


def _cpu_device() -> torch.device:
    return torch.device("cpu")


def installed() -> bool:
    """Whether the CPU patches are in place (always True with CUDA: nothing to patch)."""
    return _installed or torch.cuda.is_available()


def install() -> None:
    """Install the process-wide CPU patches (idempotent; nothing with CUDA available)."""
    global _installed
    if installed():
        return
    torch.cuda.current_device = _cpu_device
    from megatron.core.pipeline_parallel import schedules

    schedules.torch = _torch_without_cuda_zeros()
    from megatron.core.models.common.embeddings import rotary_pos_embedding

    rotary_pos_embedding.get_pos_emb_on_this_cp_rank = pos_emb_on_this_cp_rank
    _installed = True


def pos_emb_on_this_cp_rank(pos_emb: torch.Tensor, seq_dim: int, cp_group) -> torch.Tensor:
    """megatron's ``get_pos_emb_on_this_cp_rank`` without its pinned-memory CUDA index: the
    positions of chunks ``rank`` and ``2·size − 1 − rank`` of ``2·size`` equal chunks."""
    size, rank = cp_group.size(), cp_group.rank()
    index = torch.tensor([rank, 2 * size - rank - 1], device=pos_emb.device)
    shape = pos_emb.shape
    chunks = pos_emb.view(*shape[:seq_dim], 2 * size, -1, *shape[seq_dim + 1 :])
    picked = chunks.index_select(seq_dim, index)
    return picked.view(*shape[:seq_dim], -1, *shape[seq_dim + 1 :])


def _torch_without_cuda_zeros() -> types.ModuleType:
    """``torch`` as megatron's schedules see it: ``zeros(..., device="cuda")`` lands on the CPU."""
    proxy = types.ModuleType("torch")
    proxy.__dict__.update(torch.__dict__)

    def zeros(*args, device=None, **kwargs):
        return torch.zeros(*args, device="cpu" if device == "cuda" else device, **kwargs)

    proxy.zeros = zeros
    return proxy


@contextlib.contextmanager
def tensor_cuda_is_identity():
    """Within the block, ``Tensor.cuda()`` returns the tensor itself on a CPU-only torch
    (megatron's tied-embedding set-up at pipeline size > 1 moves the weight with it)."""
    if torch.cuda.is_available():
        yield
        return
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


class CpuRngTracker:
    """megatron-core's model-parallel RNG tracker, on the CPU generator.

    megatron forks a per-TP-rank RNG stream around dropout in sequence-parallel regions; its own
    tracker stores CUDA generator states. This one swaps the CPU default generator's state in and
    out instead, with the same ``add``/``fork``/``get_states``/``set_states``/``reset`` API.
    """

    def __init__(self) -> None:
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def is_initialized(self) -> bool:
        return bool(self.states_)

    def reset(self) -> None:
        self.states_.clear()
        self.seeds_.clear()

    def get_states(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.states_.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self.states_ = {k: v.clone() for k, v in states.items()}

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_ or name in self.states_:
            raise RuntimeError(f"RNG tracker state {name!r} (seed {seed}) already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise RuntimeError(f"RNG tracker state {name!r} was never added")
        outside = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outside)


#: the module globals of ``megatron.core.tensor_parallel.random`` that hold its RNG tracker
RNG_TRACKER_GLOBALS = ("_CUDA_RNG_STATE_TRACKER", "_CUDA_RNG_STATE_TRACKER_INITIALIZED")


def install_cpu_rng_tracker() -> CpuRngTracker:
    """Make megatron-core's ``get_cuda_rng_tracker()`` return a new :class:`CpuRngTracker`."""
    from megatron.core.tensor_parallel import random as mp_random

    missing = [name for name in RNG_TRACKER_GLOBALS if not hasattr(mp_random, name)]
    if missing:  # a rename would otherwise silently create new, unread globals
        raise RuntimeError(
            f"megatron.core.tensor_parallel.random has no {missing}: re-check model/"
            "megatron_compat.py against this megatron-core release"
        )
    tracker = CpuRngTracker()
    mp_random._CUDA_RNG_STATE_TRACKER = tracker
    mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    return tracker


class OffsetModuleList(torch.nn.ModuleList):
    """A ``ModuleList`` whose parameter names count from ``offset``; indexing stays local.

    A stage's layers are registered under their global index (``decoder.layers.6…`` on the
    second of two stages of a 12-layer model), so state dicts, DeepSpeed's parameter names and
    universal checkpoints read the same at every pipeline size. torch's ``ModuleList`` maps an
    index to a key in its private ``_get_abs_string_index``, overridden here.
    """

    def __init__(self, modules: list[torch.nn.Module], offset: int) -> None:
        super().__init__()
        self.offset = offset
        for i, m in enumerate(modules):
            self._modules[str(offset + i)] = m

    def _get_abs_string_index(self, idx) -> str:
        n = len(self)
        idx = int(idx)
        if not -n <= idx < n:
            raise IndexError(f"index {idx} is out of range")
        return str(self.offset + (idx % n))


def wrap_set_input_tensor(
    model: torch.nn.Module, wrapper: Callable[[Callable[[object], None], object], None]
) -> None:
    """Route what megatron's pipeline schedule hands this stage (``model.set_input_tensor(t)``)
    through ``wrapper(original, t)``."""
    original = model.set_input_tensor
    model.set_input_tensor = lambda tensor: wrapper(original, tensor)


def is_sequence_parallel(param: torch.nn.Parameter) -> bool:
    """Whether megatron (or ``model.norm``) tagged ``param`` as computed on a sequence slice under
    sequence parallelism (its gradient is a partial sum per TP rank)."""
    return bool(getattr(param, "sequence_parallel", False))
