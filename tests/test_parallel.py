"""Splitting batches over single-threaded CPU workers changes speed, not results."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from pipeline.attacks import fgsm
from pipeline.errors import Stopped
from pipeline.parallel import CoreSplit, cpu_workers


def test_same_adversarials_as_one_call(tiny_cnn):
    model, x, y = tiny_cnn
    target, eps_list = (y + 1) % 10, [0.05, 0.2]
    with CoreSplit(2, slice_size=32) as split:
        assert torch.equal(split(lambda a, b: fgsm(model, a, b, 0.1), x, y), fgsm(model, x, y, 0.1))
        listed = split(lambda a, b, t: fgsm(model, a, b, eps_list, targeted=True, target=t), x, y, target)
    whole = fgsm(model, x, y, eps_list, targeted=True, target=target)
    assert all(torch.equal(got, expected) for got, expected in zip(listed, whole, strict=True))


def test_slices_run_in_parallel_single_threaded_workers_and_main_is_untouched():
    threads_before = torch.get_num_threads()
    seen = []

    def record(a, b):
        seen.append((threading.current_thread().name, torch.get_num_threads(), len(a)))
        return a

    with CoreSplit(3) as split:
        out = split(record, torch.arange(10.0), torch.arange(10))
        assert torch.equal(out, torch.arange(10.0))
        assert sorted(n for _, _, n in seen) == [3, 3, 4]  # fewer images than a slice: one per core
        seen.clear()
        out = split(record, torch.arange(200.0), torch.arange(200))  # 200 > 3 * 64: two per core
        assert torch.equal(out, torch.arange(200.0))
        assert sorted(n for _, _, n in seen) == [33] * 4 + [34] * 2
    assert all(name.startswith("core-split") and threads == 1 for name, threads, _ in seen)
    assert torch.get_num_threads() == threads_before


def test_a_stop_between_two_thread_starts_leaves_no_worker_waiting(monkeypatch):
    """SIGTERM can land after the pool started its first worker and before the second: the first
    must not wait for the second forever (the interpreter would wait for it at exit)."""
    start_thread = ThreadPoolExecutor._adjust_thread_count
    starts = []

    def stopped_on_the_second_start(pool):
        starts.append(1)
        if len(starts) == 2:
            raise Stopped(15)
        start_thread(pool)

    monkeypatch.setattr(ThreadPoolExecutor, "_adjust_thread_count", stopped_on_the_second_start)
    with pytest.raises(Stopped):
        CoreSplit(3)
    deadline = time.monotonic() + 10
    while any(t.name.startswith("core-split") for t in threading.enumerate()):
        assert time.monotonic() < deadline, "a core-split worker is still alive"
        time.sleep(0.05)


def test_fewer_images_than_workers():
    with CoreSplit(4) as split:
        assert torch.equal(split(lambda a: a * 2, torch.ones(2)), torch.full((2,), 2.0))
        assert torch.equal(split(lambda a, b: a + (b is None), torch.ones(5), None), torch.full((5,), 2.0))


def test_worker_setting():
    assert cpu_workers("auto") == torch.get_num_threads()
    assert cpu_workers(3) == 3
    for bad in (0, -1, "many", True):
        with pytest.raises(ValueError, match="cpu_workers"):
            cpu_workers(bad)
