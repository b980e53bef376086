"""The host machine as the CPU code paths see it."""

from __future__ import annotations

import concurrent.futures
import functools
import os

__all__ = ["usable_cpus", "thread_pool"]


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which container CPU limits set), not the
    machine's count: thread pools sized by it do not oversubscribe a restricted process."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


@functools.lru_cache(maxsize=None)
def thread_pool() -> concurrent.futures.ThreadPoolExecutor:
    """One pool of ``usable_cpus()`` threads for the CPU paths that split work across cores
    (fusion pass 1, the threshold's counting passes). Its tasks must not wait on other tasks
    of the pool."""
    return concurrent.futures.ThreadPoolExecutor(usable_cpus(), thread_name_prefix="cpift-host")
