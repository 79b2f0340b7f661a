"""Independent work items (evaluation batches, calibration documents) on several CPU cores.

The evaluation's ops are single-threaded float64 references, and torch's intra-op threads speed up
only the model's large matmuls; worse, on a CPU shared with other jobs, OpenMP threads that wait
for each other at every op slow each step down several times. Separate processes of one torch
thread each use every core for everything and, on a busy machine, just share the cores.

:func:`map_items` runs ``fn(item, progress)`` for every item in ``workers`` processes forked from
this one (so they share the loaded model's memory until they write to it) and returns the results
in item order. Each item's result is whatever ``fn`` computes in one process, so it does not depend
on the number of workers. ``progress.advance(kind, amount)`` calls in a worker are forwarded to the
parent's progress object.

Forking needs a parent that has not started OpenMP threads (a forked child cannot use them): the
callers check ``torch.get_num_threads() == 1``. CUDA cannot be forked either: GPU runs use one
process.
"""
from __future__ import annotations

import multiprocessing
import os
from typing import Any, Callable, List, Optional, Sequence

import torch

__all__ = ["map_items", "resolve_workers"]

# The work of the current map_items call, inherited by the forked workers.
_job: Optional[tuple] = None


def resolve_workers(workers: Optional[int], items: int, device) -> int:
    """``workers`` (None or 0: one per CPU core this process may use) capped at ``items``; one
    on a GPU, or when this process runs several torch threads (it could not fork)."""
    if torch.device(device).type != "cpu" or torch.get_num_threads() != 1:
        return 1
    if not workers:
        try:
            workers = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            workers = os.cpu_count() or 1
    return max(1, min(workers, items))


class _Forward:
    """A worker's progress: every ``advance`` goes to the parent through ``channel``."""

    def __init__(self, channel):
        self.channel = channel

    def advance(self, kind: str, amount) -> None:
        self.channel.put((kind, amount))


def _run(index: int):
    fn, items, channel = _job
    return fn(items[index], _Forward(channel))


def map_items(fn: Callable[[Any, Any], Any], items: Sequence, workers: int,
              progress=None) -> List[Any]:
    """``[fn(item, progress) for item in items]``, on ``workers`` forked processes when
    ``workers > 1`` (items are handed out one at a time as workers free up). ``fn``'s ``progress``
    argument has ``advance(kind, amount)``, forwarded to ``progress`` (may be None)."""
    global _job
    if workers <= 1 or len(items) <= 1:
        return [fn(item, progress) for item in items]
    if torch.get_num_threads() != 1:
        raise ValueError(f"map_items: workers > 1 forks this process, which needs one torch "
                         f"thread (a forked child cannot use OpenMP threads), got "
                         f"{torch.get_num_threads()}")
    ctx = multiprocessing.get_context("fork")
    # SimpleQueue: a put is in the pipe when it returns (no feeder thread), so nothing a worker
    # reported is lost when the pool ends.
    channel = ctx.SimpleQueue()
    _job = (fn, list(items), channel)
    results: List[Any] = []
    try:
        with ctx.Pool(min(workers, len(items))) as pool:
            pending = pool.imap(_run, range(len(items)))
            while len(results) < len(items):
                try:
                    results.append(pending.next(timeout=0.5))
                except multiprocessing.TimeoutError:
                    pass
                _drain(channel, progress)
        _drain(channel, progress)
    finally:
        _job = None
    return results


def _drain(channel, progress) -> None:
    while not channel.empty():
        kind, amount = channel.get()
        if progress is not None:
            progress.advance(kind, amount)
