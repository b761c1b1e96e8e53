"""Mixed precision: which autocast dtype a run uses (`--amp`, `--amp-dtype`, and what the hardware offers)."""

from __future__ import annotations

import functools
import logging

import torch

log = logging.getLogger(__name__)


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matrix products natively (AVX512-BF16 or AMX), where bf16 autocast is
    much faster than float32; elsewhere bf16 is emulated and slower."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def autocast_dtype(amp: bool | None, amp_dtype: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `--amp` (True, False, or None = auto) and `--amp-dtype` on `device`; None = float32.

    auto: bf16 on CUDA GPUs that support it and on CPUs with native bf16, float32 elsewhere.
    fp16 (with a GradScaler) needs CUDA; on CPU it falls back to bf16, loudly.
    """
    if amp is False:
        return None
    if device.type == "cuda":
        if amp_dtype == "fp16":
            return torch.float16
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if amp is None:
            log.info("--amp auto: this GPU has no bf16; computing in float32 (--amp --amp-dtype fp16 for fp16)")
            return None
        log.warning("--amp: this GPU has no native bf16, so bf16 autocast is emulated; --amp-dtype fp16 is faster")
        return torch.bfloat16
    if amp_dtype == "fp16":
        log.warning("--amp-dtype fp16 needs CUDA (a GradScaler on CPU is not supported); using bf16 autocast")
    if cpu_has_native_bf16():
        return torch.bfloat16
    if amp is None and amp_dtype != "fp16":
        log.info("--amp auto: this CPU has no native bf16 (AVX512-BF16 or AMX); computing in float32")
        return None
    log.warning("--amp: this CPU has no native bf16 (AVX512-BF16 or AMX), so bf16 autocast is emulated and "
                "likely slower than float32 (--no-amp)")
    return torch.bfloat16


def dtype_name(dtype: torch.dtype | None) -> str:
    """How logs, metrics and metadata name an autocast dtype."""
    return {None: "float32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
