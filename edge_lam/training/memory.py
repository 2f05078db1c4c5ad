"""The C allocator's part of a device's peak memory (glibc on Linux), and how to read it.

LoRA training with checkpointing keeps little alive: SmolLM2 (bf16, batch 4 x 256) held
~590 MiB of allocated bytes at its highest (mallinfo2) while glibc's heap grew to 1.2-1.6 GiB
over a few steps on the 2-core x86 machine: the gigabytes of activations each step allocates
and frees (peft's float32 LoRA path for most of them) are freed into the heap, where the
small objects that stay alive between them (autograd's graph, checkpointed inputs, new
gradients) keep the freed space from coalescing, so later requests extend the heap again. The
freed pages stay resident. How much depends on the platform's kernels and glibc: an idle
Xeon (torch 2.11, glibc 2.39) grew by only ~280 MiB on the same step.

- `train.malloc-mmap-threshold` (mallopt M_MMAP_THRESHOLD; "setting this parameter also
  disables dynamic adjustment", mallopt(3)): a request at least this large that the heap's
  free space cannot serve gets a mapping of its own, returned to the OS on free, instead of
  growing the heap. glibc's default threshold starts at 128 KiB but rises to the size of every
  mapped block freed (up to 32 MiB), so after loading a model every activation can grow the
  heap. Each mapped block costs fresh pages (page faults): a price per step.
- `train.malloc-trim`: malloc_trim(0) after each forward pass and each local step hands the
  free pages anywhere in the heap back to the OS, so what one step leaves is not carried into
  the next (its price: those pages are faulted in again when reused).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable

from edge_lam.logs import get_logger

log = get_logger()

M_MMAP_THRESHOLD = -3  # mallopt(3) parameter numbers (malloc.h)


@functools.lru_cache(maxsize=1)
def _glibc():
    """glibc's handle, or None (another C library: musl, macOS, Windows)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
        return libc
    except (OSError, AttributeError, TypeError):
        return None


def set_mmap_threshold(kib: int) -> bool:
    """Allocations of at least `kib` KiB get their own mapping from now on, in this whole
    process (0: leave glibc's dynamic threshold alone). False where that is not glibc."""
    if not kib:
        return False
    libc = _glibc()
    if libc is None:
        log.info("train.malloc-mmap-threshold: not glibc, ignored")
        return False
    if not libc.mallopt(M_MMAP_THRESHOLD, kib * 1024):
        raise ValueError(f"mallopt refused M_MMAP_THRESHOLD={kib} KiB")
    return True


def trim() -> bool:
    """Give the heap's free pages back to the OS now (malloc_trim(0) releases free pages
    anywhere in the heap, not only at its top); False: not glibc or nothing released."""
    libc = _glibc()
    return bool(libc is not None and libc.malloc_trim(0))


def releaser(cfg) -> Callable[[], object] | None:
    """What the local loop runs after each forward pass and each step: `trim` with
    `train.malloc-trim`, else nothing."""
    return trim if cfg.train.malloc_trim else None


def process_status() -> dict[str, int]:
    """VmRSS, VmHWM (the peak), RssAnon, RssFile of this process in KiB (/proc/self/status;
    {} where there is none)."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                    out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


def heap_in_use() -> dict[str, int] | None:
    """glibc's own accounting in bytes: `live` (allocated, not freed: mallinfo2's uordblks +
    hblkhd) and `held` (heap arenas + mapped blocks); None where that is not glibc >= 2.33."""
    libc = _glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
            "uordblks", "fordblks", "keepcost")]

    libc.mallinfo2.restype = MallInfo2
    info = libc.mallinfo2()
    return {"live": info.uordblks + info.hblkhd, "held": info.arena + info.hblkhd}
