"""The host machine as the CPU code paths see it."""

from __future__ import annotations

import os

__all__ = ["usable_cpus"]


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which container CPU limits set), not the
    machine's count: thread pools sized by it do not oversubscribe a restricted process."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)
