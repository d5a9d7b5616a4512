"""The host process: glibc's allocator told to keep freed memory, and the native bfloat16 check the CPU
autocast default rests on.

glibc returns every large freed block (above M_MMAP_THRESHOLD, 128 kB to 32 MB by default) to the kernel,
so each new activation of a training step is page-faulted in again: measured on a 2-core CPU machine,
fer_kernels.mish forward + backward on 64 x 64 x 56 x 56 float32 took 42.7 ms in a plain process and
10.7 ms with freed memory kept. Raising the mmap and trim thresholds keeps the step's memory in the heap,
where the next step reuses it; the price is that the process keeps its peak memory until it exits.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

import torch

__all__ = ["KEEP_FREED_BYTES", "keep_freed_memory", "native_bfloat16"]

KEEP_FREED_BYTES = 1 << 30  # blocks up to 1 GiB come from, and go back to, the heap
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Asks glibc to keep freed memory for reuse (mallopt); True if it took, False where the C library is not
    glibc (macOS, musl, Windows), which is left as it is."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, KEEP_FREED_BYTES) and mallopt(_M_TRIM_THRESHOLD, KEEP_FREED_BYTES))


def native_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 convolutions and matrix products natively (oneDNN's judgement:
    AVX-512 BF16 or AMX); without it bfloat16 autocast is emulated and slower than float32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
