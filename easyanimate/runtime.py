"""Process-level runtime settings that make a CPU training step fast: allocator tuning and the AdamW variant.

Why (measured on the V2-width 4-layer DiT, 218.9 M fp32 parameters, see README "Training speed and several
devices"): PyTorch's CPU allocator is glibc malloc. Tensors above glibc's mmap threshold (128 KiB to 32 MiB, adapted
at run time) are mmap'ed and munmap'ed on free, and free() trims the heap top back to the OS. A training step
allocates gradients, AdamW temporaries and activations of tens of MiB each and frees them again, so every step maps
fresh pages and takes a page fault for every 4 KiB of them (~200k minor faults, 0.8 GB zeroed by the kernel per
step on that model): the optimizer step spent 6-11 s doing this instead of 0.3 s of arithmetic. Raising glibc's
``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` keeps freed blocks in the heap for reuse (the same effect as the
environment variables ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``, but applied at run time).

:func:`tune_allocator` is called once by the CLI entry point and the trainers; :func:`adamw` builds AdamW with the
fastest implementation the parameters' device supports (fused kernels on CUDA and CPU in recent torch).
No MLOps imports here (the library stays free of kfp/mlflow/tritonclient/dvc).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
from collections.abc import Iterable
from typing import Any

import torch

logger = logging.getLogger(__name__)

__all__ = ["adamw", "allocator_state", "fused_adamw_supported", "tune_allocator"]

# glibc mallopt parameter numbers (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# 1 GiB: every parameter, gradient, optimizer moment and activation of a V2 training step stays in the heap. glibc
# 2.36 accepts it; older glibc refused thresholds above HEAP_MAX_SIZE / 2 (32 MiB), which we then fall back to.
_DEFAULT_BYTES = 1 << 30
_state: dict[str, Any] = {"applied": False}


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def tune_allocator(mmap_threshold: int | None = None, trim_threshold: int | None = None) -> dict[str, Any]:
    """Keep freed large blocks in the process heap (glibc ``mallopt``), once per process; returns what was applied.

    Environment: ``EASYANIMATE_MALLOC_TUNE=0`` switches it off; glibc's own ``MALLOC_MMAP_THRESHOLD_`` /
    ``MALLOC_TRIM_THRESHOLD_`` (if the user set them) win and nothing is changed. A no-op off glibc (macOS, musl)
    or when the CUDA caching allocator makes it moot (it only matters for CPU tensors, but is harmless there too).
    """
    if _state["applied"]:
        return dict(_state)
    _state["applied"] = True
    if os.environ.get("EASYANIMATE_MALLOC_TUNE", "1").lower() in ("0", "false", "no", "off"):
        _state.update(enabled=False, reason="EASYANIMATE_MALLOC_TUNE=0")
        return dict(_state)
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") or os.environ.get("MALLOC_TRIM_THRESHOLD_"):
        _state.update(enabled=False, reason="MALLOC_*_THRESHOLD_ set in the environment (left as given)")
        return dict(_state)
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        _state.update(enabled=False, reason="no glibc mallopt on this platform")
        return dict(_state)
    mmap_bytes = int(mmap_threshold or _DEFAULT_BYTES)
    trim_bytes = int(trim_threshold or _DEFAULT_BYTES)
    ok_mmap = bool(libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(min(mmap_bytes, 2**31 - 1))))
    if not ok_mmap:  # an older glibc's ceiling
        mmap_bytes = 32 << 20
        ok_mmap = bool(libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(mmap_bytes)))
    ok_trim = bool(libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(min(trim_bytes, 2**31 - 1))))
    _state.update(enabled=ok_mmap and ok_trim, mmap_threshold=mmap_bytes if ok_mmap else None,
                  trim_threshold=trim_bytes if ok_trim else None)
    logger.debug("allocator tuning: %s", _state)
    return dict(_state)


def allocator_state() -> dict[str, Any]:
    """What :func:`tune_allocator` did in this process (``{"applied": False}`` before it ran)."""
    return dict(_state)


def fused_adamw_supported(params: Iterable[torch.nn.Parameter]) -> bool:
    """True when torch has a fused AdamW kernel for every parameter (same device type, floating point)."""
    params = list(params)
    if not params:
        return False
    devices = {p.device.type for p in params}
    if len(devices) != 1:
        return False
    device = devices.pop()
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
        supported = set(_get_fused_kernels_supported_devices())
    except ImportError:  # older torch: CUDA only
        supported = {"cuda"}
    if device not in supported:
        return False
    # DTensor parameters (FSDP2) are fine; the fused kernel needs floating point
    return all(p.is_floating_point() for p in params)


def adamw(params, *, lr: float, betas=(0.9, 0.999), weight_decay: float = 0.01, eps: float = 1e-8,
          fused: bool | None = None) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` with the fused kernel where supported (``fused=None``: auto), else ``foreach``.

    Same update rule as the default implementation (results agree to fp32 rounding); fused does one pass over each
    parameter instead of ~10 elementwise kernels and allocates no param-sized temporaries.
    ``EASYANIMATE_ADAMW=default|foreach|fused`` forces a variant (for comparisons).
    """
    params = list(params)
    flat = [p for g in params for p in g["params"]] if params and isinstance(params[0], dict) else params
    forced = os.environ.get("EASYANIMATE_ADAMW", "").lower()
    kwargs: dict[str, Any] = {}
    if forced == "default":
        kwargs["foreach"] = False
    elif forced == "foreach":
        kwargs["foreach"] = True
    elif forced == "fused" or (fused is None and fused_adamw_supported(flat)) or fused:
        kwargs["fused"] = True
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, eps=eps, **kwargs)
