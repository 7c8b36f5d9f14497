"""Settings that depend on the machine: how many CPUs the server may use."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from service.settings import Settings, available_cpus


def _affinity() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.mark.parametrize(
    ("files", "quota"),
    [
        ({"cpu.max": "150000 100000\n"}, 2),  # cgroup v2, 1.5 CPUs: rounded up
        ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),  # v1
        (
            {
                "cpu,cpuacct/cpu.cfs_quota_us": "300000\n",
                "cpu,cpuacct/cpu.cfs_period_us": "100000\n",
            },
            3,
        ),
    ],
)
def test_a_cgroup_cpu_quota_caps_the_cpus(tmp_path, files, quota):
    assert available_cpus(_write(tmp_path, files)) == min(_affinity(), quota)


@pytest.mark.parametrize(
    "files",
    [
        {},  # no cgroup files at all
        {"cpu.max": "max 100000\n"},
        {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"},
        {"cpu.max": "garbage\n"},
    ],
)
def test_without_a_quota_the_affinity_counts(tmp_path, files):
    assert available_cpus(_write(tmp_path, files)) == _affinity()


def test_auto_compute_threads_are_half_the_available_cpus_and_explicit_wins():
    assert Settings().resolved_compute_threads() == max(1, available_cpus() // 2)
    assert Settings(compute_threads=3).resolved_compute_threads() == 3
