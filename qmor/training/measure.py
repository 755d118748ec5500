"""Measured memory of this process, set beside the planner's prediction at the end of every run: on CUDA the
allocator's live tensors (`max_memory_allocated`, what the planner's parts add up to without the CUDA context and
the allocator's slack), elsewhere the resident set size (RSS) the OS reports, above what the process held before
the run started loading (the interpreter and its libraries are no part of the plan). Before a run loads, the
memory free on its device (`free_bytes`), which the planner's prediction is held against (qmor/training/resolve.py)."""

from __future__ import annotations

import os
import resource
import sys

import torch


def start(device: torch.device) -> int:
    """Begin a measurement: reset CUDA's peak counter; returns the memory in use now, the baseline."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    return rss_now()


def peak_since(device: torch.device, baseline: int) -> int:
    """The peak since `start`, above its baseline. On a CPU the peak is the process's lifetime high-water mark, so a
    second run in one process reports the larger of the two."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) - baseline
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max(0, maxrss * (1 if sys.platform == "darwin" else 1024) - baseline)  # bytes on macOS, KiB on Linux


def rss_now() -> int:
    try:  # Linux: resident pages now; elsewhere the high-water mark is the best available
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def free_bytes(device: torch.device) -> int | None:
    """Memory free for a run on `device` now: on CUDA what the driver reports free (asking starts the CUDA context,
    which is then no longer free), on a CPU the kernel's MemAvailable; None where neither can be read."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024  # kB
    except (OSError, KeyError, ValueError, IndexError):
        return None


def planned_live_bytes(plan) -> int:
    """The planner's peak without what `max_memory_allocated` does not see: the CUDA context and allocator slack."""
    return plan.total_bytes - plan.parts.get("CUDA context", 0) - plan.parts.get("allocator slack", 0)
