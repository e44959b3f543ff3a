"""The one attention kernel everything calls, and the choice of that kernel (``attend``,
``resolve_backend``).

All tensors are ``[batch, seq, heads, head_dim]`` (flash-attn's layout). ``k``/``v`` may carry
fewer heads than ``q`` (grouped-query attention); query head ``h`` reads key/value group
``h // (heads // groups)``, megatron-core's and flash-attn's convention.

Backends (``model.attention_backend``):

========== =================================================================================
``auto``   the fastest correct kernel for the device (see :func:`resolve_backend`)
``sdpa``   ``torch.nn.functional.scaled_dot_product_attention`` with torch's own kernel choice
``cudnn``  torch SDPA pinned to its cuDNN kernel (``SDPBackend.CUDNN_ATTENTION``; CUDA only)
``sdpa-flash`` torch SDPA pinned to its FlashAttention-2 kernel (``SDPBackend.FLASH_ATTENTION``;
           on CPU, torch's CPU flash kernel)
``efficient`` torch SDPA pinned to its memory-efficient (xformers) kernel (CUDA only)
``flash``  the ``flash-attn`` package (FlashAttention-2), CUDA fp16/bf16
``flash4`` the ``flash-attn-4`` package (FlashAttention-4, CuTe DSL), Hopper/Blackwell fp16/bf16
========== =================================================================================

The choice depends only on ``q`` (device, dtype, head_dim) and the dropout, never on the number of
key/value heads, so the two passes of twicing attention (``attend(q, k, v)`` and
``attend(q, k_full, o1)``) always run the same kernel. A pinned kernel that takes no grouped
keys/values natively gets them repeated to the query heads (same kernel, more memory).
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from model.attention import torch_compat
from model.attention.registry import BACKENDS, Backend  # names: torch-free, in the registry

#: what ``resolve_backend`` returns: every backend but ``auto``
CONCRETE: tuple[str, ...] = tuple(b for b in BACKENDS if b != "auto")

_HALF = (torch.float16, torch.bfloat16)
#: ``auto``'s preference on Hopper (compute capability 9.x), fastest first; see resolve_backend
HOPPER_ORDER: tuple[str, ...] = ("cudnn", "flash4", "flash", "sdpa-flash", "efficient")
#: ``auto``'s preference on other CUDA devices
CUDA_ORDER: tuple[str, ...] = ("flash", "sdpa-flash", "efficient")


def _module_present(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def flash_available() -> bool:
    """True when the flash-attn package (FlashAttention-2) is importable and CUDA is present."""
    return torch.cuda.is_available() and _module_present("flash_attn_2_cuda")


def flash4_available() -> bool:
    """True when the flash-attn-4 package (``flash_attn.cute``) and its CuTe DSL are importable
    and CUDA is present."""
    return (
        torch.cuda.is_available()
        and _module_present("flash_attn.cute")
        and _module_present("cutlass")
    )


def _on_cuda(q: torch.Tensor) -> bool:
    return q.is_cuda


def _capability(q: torch.Tensor) -> tuple[int, int]:
    return torch.cuda.get_device_capability(q.device)


# ----------------------------------------------------------------------------- torch SDPA
def _sdpa_backends() -> dict[str, object]:
    from torch.nn.attention import SDPBackend

    return {
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "sdpa-flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
    }


_CAN_USE = {
    "cudnn": "can_use_cudnn_attention",
    "sdpa-flash": "can_use_flash_attention",
    "efficient": "can_use_efficient_attention",
}
_SDPA_NAMES = {
    "cudnn": "cuDNN",
    "sdpa-flash": "FlashAttention-2",
    "efficient": "memory-efficient",
}


def _sdpa_refusal(name: str, q, k, v, causal: bool, dropout_p: float) -> str | None:
    """Why torch SDPA's pinned kernel ``name`` cannot take these ``[b, h, s, d]`` CUDA tensors
    (torch's own reasons), or None when it can."""
    cuda = torch.backends.cuda
    gqa = q.size(1) != k.size(1)
    try:
        params = cuda.SDPAParams(q, k, v, None, dropout_p, causal, gqa)
    except TypeError:  # torch < 2.5: no enable_gqa field
        params = cuda.SDPAParams(q, k, v, None, dropout_p, causal)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ok = getattr(cuda, _CAN_USE[name])(params, True)
    if ok:
        return None
    reasons = "; ".join(str(w.message).strip() for w in caught) or "no reason given"
    return f"torch SDPA's {_SDPA_NAMES[name]} kernel refuses these inputs: {reasons}"


def _bhsd(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2)


# ----------------------------------------------------------------------------- resolution
def unavailable_reason(backend: str, q: torch.Tensor, dropout_p: float = 0.0) -> str | None:
    """Why the concrete ``backend`` cannot run attention on ``q`` (what is missing), or None.

    Checked on ``q``-shaped keys and values (twicing's second pass); grouped keys/values that a
    kernel takes only at full width are repeated in :func:`attend`.
    """
    where = f"device={q.device.type}, dtype={str(q.dtype).removeprefix('torch.')}"
    if backend == "sdpa":
        return None
    if backend == "flash":
        if not (_on_cuda(q) and q.dtype in _HALF and flash_available()):
            return (
                "attention backend 'flash' needs CUDA fp16/bf16 tensors and the flash-attn "
                f"package (got {where}, "
                f"flash-attn installed={_module_present('flash_attn_2_cuda')})"
            )
        return None
    if backend == "flash4":
        missing = [m for m in ("flash_attn.cute", "cutlass") if not _module_present(m)]
        if missing:
            return (
                "attention backend 'flash4' needs the flash-attn-4 package (FlashAttention-4, "
                f"CuTe DSL: `pip install flash-attn-4`, which brings nvidia-cutlass-dsl); missing "
                f"module(s) {', '.join(missing)}"
            )
        if not (_on_cuda(q) and q.dtype in _HALF):
            return f"attention backend 'flash4' needs CUDA fp16/bf16 tensors (got {where})"
        if _capability(q)[0] not in (9, 10):
            return (
                "attention backend 'flash4' needs a Hopper (sm90) or Blackwell (sm100) GPU, got "
                f"compute capability {_capability(q)}"
            )
        if dropout_p:
            return "attention backend 'flash4' has no attention dropout"
        return None
    if backend in _CAN_USE:
        if not _on_cuda(q):
            if backend == "sdpa-flash":
                return None  # torch's CPU flash kernel (any float dtype)
            return (
                f"attention backend {backend!r} is torch SDPA's {_SDPA_NAMES[backend]} kernel, "
                f"which needs a CUDA device (got {where})"
            )
        if backend == "cudnn" and not torch.backends.cudnn.is_available():
            return "attention backend 'cudnn' needs cuDNN, which this torch build cannot load"
        qt = _bhsd(q)
        return _sdpa_refusal(backend, qt, qt, qt, True, dropout_p)
    raise ValueError(f"attention backend {backend!r} is not one of {BACKENDS}")


class ResolvedBackend(str):
    """A concrete backend name that :func:`resolve_backend` already checked for this kind of
    input: :func:`attend` runs it without checking again (``CoreAttention`` resolves once per
    module and input kind)."""


def resolve_backend(backend: Backend, q: torch.Tensor, dropout_p: float = 0.0) -> str:
    """The concrete kernel (one of :data:`CONCRETE`) for ``q``; a named one that cannot run is a
    ``RuntimeError`` naming what is missing.

    ``auto`` on CUDA fp16/bf16 tries, in order, and takes the first that runs:

    - Hopper (H100/H200, sm90): ``cudnn``, ``flash4``, ``flash``, ``sdpa-flash``, ``efficient``.
      torch SDPA's own priority puts its FlashAttention-2 kernel first, but FA2 uses none of
      Hopper's wgmma/TMA instructions and reaches about 330 TFLOP/s there, while cuDNN's sm90
      kernel reaches about 630 (the same as FlashAttention-3; pytorch/pytorch#142132,
      tritonbench#41), measured 1.7-2.3x faster for training shapes at the same accuracy
      (huggingface/transformers#48163, which prefers cuDNN on sm90 only). cuDNN ships inside torch,
      so it needs nothing extra; FlashAttention-4 targets the same instructions but needs its own
      ~100 MiB package; the flash-attn package is FA2 again. ``benchmarks/gpu/check.py`` measures
      every backend on the GPU at hand and prints whether ``auto``'s pick was the fastest correct
      one.
    - other CUDA devices: ``flash``, ``sdpa-flash``, ``efficient`` (FA2 is the fastest on Ampere
      and Ada, where cuDNN measured slower or even in the same comparison).

    Anything else (CPU, fp32) is ``sdpa``: on CPU its flash kernel, with twicing's two passes
    fused into one autograd function (:func:`cpu_kernel_applies`).
    """
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not one of {BACKENDS}")
    if backend != "auto":
        reason = unavailable_reason(backend, q, dropout_p)
        if reason is not None:
            raise RuntimeError(reason)
        return backend
    if not (_on_cuda(q) and q.dtype in _HALF):
        return "sdpa"
    order = HOPPER_ORDER if _capability(q)[0] == 9 else CUDA_ORDER
    for name in order:
        if unavailable_reason(name, q, dropout_p) is None:
            return name
    return "sdpa"


def cpu_kernel_applies(backend: Backend, q: torch.Tensor) -> bool:
    """Whether torch's CPU flash-attention primitives (forward + backward) can serve ``q``."""
    return (
        backend in ("auto", "sdpa", "sdpa-flash")
        and q.device.type == "cpu"
        and q.dtype in (torch.float32, torch.bfloat16)
        and torch_compat.available()
    )


#: query × key positions from which a bottom-right causal call on CPU skips the explicit mask
#: (:class:`_BottomRightCPU`; 1 Mi positions = a 1 MiB bool mask). Below it the mask costs
#: nothing and the one masked kernel call accumulates each row in the same order as the
#: full-sequence call, so context-parallel chunks round as the single-rank run does.
MASK_FREE_FROM = 1 << 20


class _BottomRightCPU(torch.autograd.Function):
    """Causal attention of the last ``s_q`` of ``s_k`` positions on torch's CPU flash primitives
    (``[b, h, s, d]``), without an ``s_q × s_k`` mask: the keys before the queries (all visible)
    and the square block that ends with them (causal) are two kernel calls whose outputs merge by
    their log-sum-exps. Backward runs each block's kernel backward against the merged output and
    log-sum-exp, which is the merged softmax's exact gradient (the flash-attention identity), so
    memory stays O(s) as at ``s_q = s_k`` (context parallelism's chunks, chunked prefill)."""

    @staticmethod
    def forward(ctx, q, k, v, scale: float | None):
        p = k.size(2) - q.size(2)
        o_a, lse_a = torch_compat.cpu_forward(q, k[:, :, :p], v[:, :, :p], False, scale)
        o_b, lse_b = torch_compat.cpu_forward(q, k[:, :, p:], v[:, :, p:], True, scale)
        lse = torch.logaddexp(lse_a, lse_b)
        w_a, w_b = ((x - lse).exp().unsqueeze(-1) for x in (lse_a, lse_b))
        out = (o_a.float() * w_a + o_b.float() * w_b).to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        p, scale = k.size(2) - q.size(2), ctx.scale
        dout = dout.contiguous()
        backward = torch_compat.cpu_backward
        dq, dk_a, dv_a = backward(dout, q, k[:, :, :p], v[:, :, :p], out, lse, False, scale)
        dq_b, dk_b, dv_b = backward(dout, q, k[:, :, p:], v[:, :, p:], out, lse, True, scale)
        return dq.add_(dq_b), torch.cat([dk_a, dk_b], 2), torch.cat([dv_a, dv_b], 2), None


def repeat_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Expand ``[b, s, groups, d]`` to ``[b, s, heads, d]`` (one group per heads/groups queries)."""
    groups = x.size(2)
    if groups == heads:
        return x
    return x.repeat_interleave(heads // groups, dim=2)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> None:
    """Raise ``ValueError`` unless ``[b, s, h, d]`` shapes fit together (GQA allowed)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"attention expects 4-D [b, s, h, d] tensors, got {q.shape}, {k.shape}, {v.shape}"
        )
    if k.size(2) != v.size(2) or q.size(2) % k.size(2):
        raise ValueError(
            f"query heads ({q.size(2)}) must be a multiple of key/value heads "
            f"({k.size(2)}, {v.size(2)}), and keys and values need the same head count"
        )
    if causal and q.size(1) > k.size(1):
        raise ValueError(
            f"causal attention needs seq_q <= seq_k (queries are the last keys), got "
            f"{q.size(1)} and {k.size(1)}"
        )


# ----------------------------------------------------------------------------- kernels
Kernel = Callable[..., torch.Tensor]


def _sdpa(q, k, v, causal: bool, scale: float | None, dropout_p: float, pin: str | None = None):
    gqa = q.size(2) != k.size(2)
    qt, kt, vt = _bhsd(q), _bhsd(k), _bhsd(v)
    if pin is None:
        out = F.scaled_dot_product_attention(
            qt, kt, vt, is_causal=causal, scale=scale, dropout_p=dropout_p, enable_gqa=gqa
        )
        return _bhsd(out)
    from torch.nn.attention import sdpa_kernel

    if gqa and q.is_cuda and _sdpa_refusal(pin, qt, kt, vt, causal, dropout_p) is not None:
        # this kernel takes no grouped keys/values here: same kernel on repeated ones
        kt, vt = _bhsd(repeat_kv(k, q.size(2))), _bhsd(repeat_kv(v, q.size(2)))
        gqa = False
    with sdpa_kernel(_sdpa_backends()[pin]):
        out = F.scaled_dot_product_attention(
            qt, kt, vt, is_causal=causal, scale=scale, dropout_p=dropout_p, enable_gqa=gqa
        )
    return _bhsd(out)


def _flash(q, k, v, causal: bool, scale: float | None, dropout_p: float) -> torch.Tensor:
    from flash_attn import flash_attn_func  # optional GPU extra

    return flash_attn_func(q, k, v, dropout_p=dropout_p, softmax_scale=scale, causal=causal)


def _flash4(q, k, v, causal: bool, scale: float | None, dropout_p: float) -> torch.Tensor:
    from flash_attn.cute import flash_attn_func  # flash-attn-4, optional

    out = flash_attn_func(q, k, v, softmax_scale=scale, causal=causal)
    return out[0] if isinstance(out, tuple) else out


#: concrete backend -> kernel on ``[b, s, h, d]``: (q, k, v, causal, scale, dropout_p) -> out
KERNELS: dict[str, Kernel] = {
    "sdpa": _sdpa,
    "cudnn": lambda *a: _sdpa(*a, pin="cudnn"),
    "sdpa-flash": lambda *a: _sdpa(*a, pin="sdpa-flash"),
    "efficient": lambda *a: _sdpa(*a, pin="efficient"),
    "flash": _flash,
    "flash4": _flash4,
}


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
    backend: Backend = "auto",
    dropout_p: float = 0.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``softmax(q kᵀ · scale + mask) v`` per head; returns ``[batch, seq, heads, head_dim]``.

    ``scale`` defaults to ``1/sqrt(head_dim)``. ``causal`` masks keys after each query; with
    ``seq_q < seq_k`` the queries are the last ``seq_q`` positions (bottom-right aligned, as in
    incremental decoding: query ``i`` at position ``seq_k − seq_q + i`` sees keys up to it).
    ``mask`` (bool, broadcastable to ``[batch, heads, seq_q, seq_k]``, True = may attend, e.g.
    key padding) further restricts the keys.
    ``dropout_p`` drops attention weights (single-pass callers only). ``backend`` is resolved by
    :func:`resolve_backend` (on ``q`` alone, so every call with the same ``q`` uses one kernel),
    unless it is a :class:`ResolvedBackend` (already resolved for this kind of ``q``).
    A masked or ``seq_q != seq_k`` call runs on SDPA with an explicit mask, except on the
    flash-attn kernels, which align ``seq_q < seq_k`` bottom-right themselves, and on CPU from
    :data:`MASK_FREE_FROM` positions (two mask-free kernel calls merged by log-sum-exp).
    """
    check_qkv(q, k, v, causal)
    name = (
        backend if isinstance(backend, ResolvedBackend) else resolve_backend(backend, q, dropout_p)
    )
    s_q, s_k = q.size(1), k.size(1)
    if mask is None and (s_q == s_k or not causal or name in ("flash", "flash4")):
        return KERNELS[name](q, k, v, causal, scale, dropout_p)
    if (
        mask is None
        and 1 < s_q < s_k
        and s_q * s_k >= MASK_FREE_FROM
        and dropout_p == 0
        and cpu_kernel_applies(name, q)
    ):
        t = (x.transpose(1, 2) for x in (q, k, v))
        return _BottomRightCPU.apply(*t, scale).transpose(1, 2)
    if causal and s_q > 1:
        tril = torch.ones(s_q, s_k, dtype=torch.bool, device=q.device).tril(s_k - s_q)
        mask = tril if mask is None else mask & tril
    out = F.scaled_dot_product_attention(
        _bhsd(q),
        _bhsd(k),
        _bhsd(v),
        attn_mask=mask,
        scale=scale,
        dropout_p=dropout_p,
        enable_gqa=q.size(2) != k.size(2),
    )
    return _bhsd(out)
