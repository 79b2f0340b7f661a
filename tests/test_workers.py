"""absparse.eval.workers: work items on forked processes, results in item order, progress
forwarded, failures raised, and the checks that keep forking safe."""
import os

import pytest
import torch

from absparse.eval.workers import map_items, resolve_workers


class Recorder:
    def __init__(self):
        self.calls = []

    def advance(self, kind, amount):
        self.calls.append((kind, amount))


def _square_sum(n, progress):
    """sum(k^2 for k < n) computed by torch, with the pid that computed it."""
    if progress is not None:
        progress.advance("items", 1)
        progress.advance("units", n)
    return int((torch.arange(n, dtype=torch.int64) ** 2).sum()), os.getpid()


def _fails_on_three(n, progress):
    if n == 3:
        raise ValueError("item 3")
    return n


@pytest.fixture()
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_results_in_item_order_with_progress_forwarded(one_thread):
    items = [7, 1, 30, 4, 12, 0, 9]
    expected = [n * (n - 1) * (2 * n - 1) // 6 for n in items]        # closed form of the sum
    rec = Recorder()
    out = map_items(_square_sum, items, 3, rec)
    assert [v for v, _ in out] == expected
    assert all(pid != os.getpid() for _, pid in out)                   # computed in workers
    # Every report arrived (in some order): one "items" and the item's "units" per item.
    assert sorted(rec.calls) == sorted([("items", 1) for _ in items] +
                                       [("units", n) for n in items])
    inline = map_items(_square_sum, items, 1, None)
    assert [v for v, _ in inline] == expected and {pid for _, pid in inline} == {os.getpid()}


def test_a_failing_item_raises_in_the_caller(one_thread):
    with pytest.raises(ValueError, match="item 3"):
        map_items(_fails_on_three, [1, 2, 3, 4], 2)


def test_forking_needs_one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(ValueError, match="one torch thread"):
            map_items(_square_sum, [1, 2], 2)
        assert resolve_workers(0, 10, "cpu") == 1                      # auto: stays in-process
    finally:
        torch.set_num_threads(threads)


def test_resolve_workers(one_thread):
    cores = len(os.sched_getaffinity(0))
    assert resolve_workers(0, 100, "cpu") == cores
    assert resolve_workers(None, 1, "cpu") == 1                        # at most one per item
    assert resolve_workers(5, 3, "cpu") == 3
    assert resolve_workers(4, 10, "cuda") == 1                         # a GPU run: one process
