"""Progress of the evaluation, weighted by its work: prefill tokens and decode tokens.

:func:`absparse.eval.evaluation.evaluate` does two kinds of work with very different speeds: the dense
prefill of every batch (once per batch, thousands of tokens in one forward pass) and the decode
runs (per batch, for dense and every method x budget: the cache is stacked, then ``steps`` forward
passes of ``rows`` tokens each). Counting runs (the old bar) charges a whole batch's prefill to
its first run, so the first estimate is hours too long and the bar jumps at every new batch.

:class:`WorkProgress` counts both kinds in tokens (prefill tokens; decode tokens = rows x steps
of a run) and measures the seconds spent on each kind separately. The time left is::

    remaining = (prefill tokens left) * (seconds per prefill token so far)
              + (decode tokens left)  * (seconds per decode token so far)

It is unknown ("estimating") until both kinds have been measured once: after the first batch's
prefill and its first run. Example: 2 batches of 10 x 2,000 prompt tokens and 40 runs of 10 rows
x 10 steps (4,000 decode tokens per batch); if the first prefill took 20 s (1 ms per token) and
the first run 1 s (10 ms per decode token), the estimate after that run is
20,000 * 1 ms + (8,000 - 100) * 10 ms = 99 s.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, Optional

__all__ = ["WorkProgress", "KINDS"]

KINDS = ("prefill", "decode")


class WorkProgress:
    """A progress bar (tqdm) over ``prefill_tokens`` + ``decode_tokens`` of work.

    ``advance(kind, tokens)`` reports finished work; the time since the previous call (or since
    construction) is charged to ``kind``. ``clock`` is injectable for tests; ``disable`` shows no
    bar (the estimate still works).
    """

    def __init__(self, prefill_tokens: int, decode_tokens: int, desc: str = "evaluate",
                 disable: bool = False, clock: Callable[[], float] = time.perf_counter):
        if prefill_tokens < 0 or decode_tokens < 0:
            raise ValueError(f"WorkProgress: expected token counts >= 0, got prefill "
                             f"{prefill_tokens}, decode {decode_tokens}")
        self.total: Dict[str, int] = {"prefill": int(prefill_tokens),
                                      "decode": int(decode_tokens)}
        self.done: Dict[str, int] = {k: 0 for k in KINDS}
        self.seconds: Dict[str, float] = {k: 0.0 for k in KINDS}
        self._clock = clock
        self._last = clock()
        self._bar = None
        if not disable:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=1000, desc=desc, dynamic_ncols=True,
                             bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}{postfix}")
            self._refresh()

    def rate(self, kind: str) -> Optional[float]:
        """Measured seconds per token of ``kind``, or None before any was done."""
        return self.seconds[kind] / self.done[kind] if self.done[kind] else None

    def remaining_seconds(self) -> Optional[float]:
        """Estimated seconds left, or None until each kind with work left has been measured."""
        left = 0.0
        for kind in KINDS:
            todo = self.total[kind] - self.done[kind]
            if todo <= 0:
                continue
            rate = self.rate(kind)
            if rate is None:
                return None
            left += todo * rate
        return left

    def fraction(self) -> float:
        """Share of the work done, in estimated time (0 until the estimate exists: a count of
        tokens would overstate the prefill, which is fast per token)."""
        left = self.remaining_seconds()
        if left is None:
            return 0.0
        spent = sum(self.seconds.values())
        return spent / (spent + left) if spent + left > 0 else 1.0

    def advance(self, kind: str, tokens: int) -> None:
        if kind not in KINDS:
            raise ValueError(f"WorkProgress.advance: kind: expected one of {KINDS}, got {kind!r}")
        now = self._clock()
        self.seconds[kind] += now - self._last
        self._last = now
        self.done[kind] += int(tokens)
        self._refresh()

    def _refresh(self) -> None:
        if self._bar is None:
            return
        left = self.remaining_seconds()
        self._bar.n = min(1000, round(1000 * self.fraction()))
        if left is None:
            text = "estimating the time left"
        else:
            text = f"about {_clock_text(left)} left" if left > 0 else "done"
        self._bar.set_postfix_str(text, refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _clock_text(seconds: float) -> str:
    """12.4 -> "0:12", 4000 -> "1:06:40"."""
    s = int(round(seconds))
    h, m = divmod(s // 60, 60)
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"
