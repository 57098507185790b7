"""One home for measuring what a run costs: wall time and peak memory.

:func:`peak_memory` is a context manager; after the block, ``.bytes`` is the peak memory
of the block and ``.kind`` says what was measured:

- ``"cuda_max_allocated"``: on a CUDA device, ``torch.cuda.max_memory_allocated`` after
  ``torch.cuda.reset_peak_memory_stats``: the most bytes held by tensors at once during
  the block (the caching allocator's reserve and the CUDA context are not counted).
- ``"process_peak_rss"``: on a CPU under Linux, the peak resident set size of the whole
  process during the block (``VmHWM`` of ``/proc/self/status``, reset before the block by
  writing ``5`` to ``/proc/self/clear_refs``). It includes everything the process holds:
  the interpreter, the libraries, the models and data loaded before the block; it is the
  process's peak, not the block's increment.
- ``"process_peak_rss_lifetime"``: where that peak cannot be reset (not Linux, or
  ``clear_refs`` not writable), ``resource.getrusage(RUSAGE_SELF).ru_maxrss``: the
  process's peak since it started, so a block can only raise it.

Time is measured with :func:`time.perf_counter`; on a CUDA device :func:`timed`
synchronises before and after so that queued kernels are counted.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["PeakMemory", "peak_memory", "Timer", "timed", "MEMORY_KINDS"]

#: What :attr:`PeakMemory.kind` can be (see the module docstring).
MEMORY_KINDS = ("cuda_max_allocated", "process_peak_rss", "process_peak_rss_lifetime")

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass
class PeakMemory:
    """The peak memory of a block, in bytes, and what kind of peak it is (after the block)."""

    device: torch.device
    kind: str = ""
    bytes: int | None = None  # the peak (see kind)
    start_bytes: int | None = None  # at entry: CUDA bytes allocated, or the process's RSS

    @property
    def increase(self) -> int | None:
        """How far the peak rose above the memory held at entry (bytes), when both are known."""
        if self.bytes is None or self.start_bytes is None:
            return None
        return max(0, self.bytes - self.start_bytes)


def _device(device) -> torch.device:
    if isinstance(device, torch.device):
        return device
    if isinstance(device, str):
        try:
            return torch.device(device)
        except RuntimeError as err:
            raise ValueError(f"device must name a torch device, got {device!r}") from err
    raise TypeError(f"device must be a torch.device or a str, got {type(device).__name__}")


def _vm_hwm_bytes() -> int | None:
    """The process's peak resident set size (``VmHWM``) in bytes, or None where unreadable."""
    try:
        match = re.search(r"^VmHWM:\s+(\d+)\s+kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def _vm_rss_bytes() -> int | None:
    """The process's resident set size now (``VmRSS``) in bytes, or None where unreadable."""
    try:
        match = re.search(r"^VmRSS:\s+(\d+)\s+kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def _reset_rss_peak() -> bool:
    """Reset the process's peak RSS (Linux ``clear_refs``); False where that is not possible."""
    if _vm_hwm_bytes() is None:
        return False
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def _lifetime_rss_bytes() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, kB on Linux


@contextmanager
def peak_memory(device: torch.device | str = "cpu") -> Iterator[PeakMemory]:
    """Measure the peak memory of the block on ``device`` (see the module docstring).

    ``with peak_memory(device) as peak: ...`` then ``peak.bytes`` (int), ``peak.kind`` and
    ``peak.increase`` (the rise above what was held at entry, the block's own share).
    On a CUDA device the peak statistics of that device are reset at entry.
    """
    dev = _device(device)
    result = PeakMemory(dev)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        result.start_bytes = int(torch.cuda.memory_allocated(dev))
        try:
            yield result
        finally:
            torch.cuda.synchronize(dev)
            result.kind, result.bytes = MEMORY_KINDS[0], int(torch.cuda.max_memory_allocated(dev))
        return
    resettable = _reset_rss_peak()
    result.start_bytes = _vm_rss_bytes()
    try:
        yield result
    finally:
        hwm = _vm_hwm_bytes() if resettable else None
        if hwm is not None:
            result.kind, result.bytes = MEMORY_KINDS[1], hwm
        else:
            result.kind, result.bytes = MEMORY_KINDS[2], _lifetime_rss_bytes()


@dataclass
class Timer:
    """Wall seconds of a block (after the block)."""

    seconds: float = 0.0


@contextmanager
def timed(device: torch.device | str = "cpu") -> Iterator[Timer]:
    """Wall time of the block; on a CUDA device, synchronised at entry and exit."""
    dev = _device(device)
    result = Timer()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    start = time.perf_counter()
    try:
        yield result
    finally:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        result.seconds = time.perf_counter() - start
