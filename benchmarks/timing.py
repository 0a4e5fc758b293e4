"""Timing and peak-memory measurement for one callable, on CUDA or CPU.

CUDA: CUDA events around each call, synchronised; warm-up calls (compilation, autotuning) are
not timed; the number of timed calls adapts to the call's length (a time budget per row), and
median, 20th and 80th percentiles are reported. Peak memory is torch.cuda.max_memory_allocated
during one separate call minus the memory allocated before it (so the inputs are excluded and
the outputs, e.g. dW, are included).

CPU: time.perf_counter; peak memory is the growth of the process's resident set, sampled every
millisecond by a thread. glibc is told (mallopt) to serve every block above 64 KiB by mmap, so
freed tensors leave the resident set at once and the growth tracks live tensors; it is still
approximate (sampling) and labelled as such in the results.
"""
from __future__ import annotations

import gc
import statistics
import threading
import time

import torch


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cleanup(device: torch.device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _quantile(xs, q):
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0]
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def time_call(fn, device: torch.device, *, warmup: int = 1, target_ms: float = 1500.0, min_reps: int = 3,
              max_reps: int = 25) -> dict:
    """Runs fn() warmup times, then enough timed times to fill about target_ms. Returns ms statistics."""
    def once():
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        del out
        return (time.perf_counter() - t0) * 1e3

    t_est = None
    for _ in range(max(1, warmup)):
        t_est = once()
    if t_est > 200:
        # the first call may have compiled or autotuned: estimate the call's length from another one
        t_est = once()
    if t_est > 2000:
        min_reps = 2
    reps = int(max(min_reps, min(max_reps, target_ms // max(t_est, 1e-3))))
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            out = fn()
            times.append((time.perf_counter() - t0) * 1e3)
        del out
    return {
        "median_ms": statistics.median(times),
        "p20_ms": _quantile(times, 0.2),
        "p80_ms": _quantile(times, 0.8),
        "reps": reps,
    }


_malloc_tuned = False


def _tune_malloc():
    """M_MMAP_THRESHOLD = M_TRIM_THRESHOLD = 64 KiB: large frees go back to the OS (glibc only)."""
    global _malloc_tuned
    if _malloc_tuned:
        return
    _malloc_tuned = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 16)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def peak_memory_mb(fn, device: torch.device) -> tuple[float, object]:
    """(peak memory above what was allocated before the call, in MB; fn's result)."""
    cleanup(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20, out
    _tune_malloc()
    base = _rss_bytes()
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.001)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        out = fn()
    finally:
        stop.set()
        th.join()
    peak[0] = max(peak[0], _rss_bytes())
    return (peak[0] - base) / 2**20, out
