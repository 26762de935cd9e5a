"""The suite's thread count follows the cores that other processes leave idle (tests/machine_load.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests import machine_load


@pytest.mark.parametrize(("idle", "cores", "threads"), [
    (None, 2, None),   # /proc/stat unreadable: torch's default
    (0.1, 2, 1),       # 4 busy processes on 2 cores: one thread, never zero
    (1.2, 2, 1),
    (1.6, 2, None),    # an idle 2-core machine keeps torch's default
    (5.6, 8, 6),
    (8.0, 8, None),
])
def test_threads_follow_the_idle_cores(idle: float | None, cores: int, threads: int | None) -> None:
    assert machine_load.threads_for(idle, cores) == threads


def test_idle_cores_come_from_the_change_in_cpu_ticks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # cpu  user nice system idle iowait irq softirq: 300 of the 400 new ticks idle or waiting on I/O
    samples = iter(["cpu  1000 0 500 2000 100 0 0\n", "cpu  1080 0 520 2250 150 0 0\n"])
    stat = tmp_path / "stat"
    real_ticks = machine_load._cpu_ticks

    def next_sample(path: str) -> tuple[float, float]:
        stat.write_text(next(samples))
        return real_ticks(path)

    monkeypatch.setattr(machine_load, "_cpu_ticks", next_sample)
    assert machine_load.cores_left_idle(0, str(stat), cores=4) == pytest.approx(4 * 300 / 400)


def test_no_stat_file_means_no_measurement(tmp_path: Path) -> None:
    assert machine_load.cores_left_idle(0, str(tmp_path / "missing")) is None


def test_a_thread_variable_decides_over_the_measurement() -> None:
    assert machine_load.thread_variable_set({"OMP_NUM_THREADS": "2"})
    assert machine_load.thread_variable_set({"MKL_NUM_THREADS": "1"})
    assert not machine_load.thread_variable_set({"PATH": "/bin"})


def test_this_suite_runs_on_the_threads_it_chose() -> None:
    threads, _ = machine_load.choose_suite_threads()
    if threads is None:
        pytest.skip("the machine was idle at the start (or OMP_NUM_THREADS was set): torch's default threads")
    assert os.environ["OMP_NUM_THREADS"] == str(threads)
    assert torch.get_num_threads() == threads
