"""The time budget plugin (tests/time_budget.py): its check on given figures, and a real session under xdist that
fails on CPU time spent in the test process, in a subprocess it waited for and in one that outlives it."""

import os
import subprocess
import sys
from pathlib import Path

from time_budget import Budget, by_file, over_budget

BUDGET = Budget(test_s=10, file_s=25, suite_s=40)


def test_within_the_budget_nothing_is_reported():
    seconds = {"tests/a/test_x.py::test_one": 9.5, "tests/a/test_x.py::test_two[a/b]": 9.5, "tests/test_y.py::t": 9}
    assert over_budget(seconds, BUDGET, whole_suite=True) == []
    assert by_file(seconds) == {"tests/a/test_x.py": 19.0, "tests/test_y.py": 9}


def test_a_slow_test_a_slow_file_and_a_slow_suite_are_each_named():
    seconds = {"tests/test_x.py::test_slow": 12, "tests/test_x.py::test_b": 9, "tests/test_x.py::test_c[x::y]": 8}
    seconds |= {"tests/test_y.py::test_d": 9, "tests/test_z.py::test_e": 9}
    assert over_budget(seconds, BUDGET, whole_suite=True) == [
        "test tests/test_x.py::test_slow: 12.0 CPU s > 10 s for one test",
        "file tests/test_x.py: 29.0 CPU s > 25 s for one file (one worker runs it: split it)",
        "the suite: 47.0 CPU s > 40 s",
    ]
    # a part of the suite (paths, -k, -m on the command line) is not checked against the suite's total
    assert over_budget(seconds, BUDGET, whole_suite=False)[-1].startswith("file tests/test_x.py")


_CONFTEST = """
import sys
sys.path.insert(0, {tests!r})
from time_budget import Budget, TimeBudget

def pytest_configure(config):
    config.pluginmanager.register(TimeBudget(config, Budget(test_s=0.4, file_s=100, suite_s=100)), "time-budget")
"""

_TESTS = """
import subprocess, sys, time

import pytest

BURN = "import time\\nend = time.process_time() + 0.6\\nwhile time.process_time() < end: pass"

def test_burns_cpu_here():
    exec(BURN)

def test_burns_cpu_in_a_subprocess():
    subprocess.run([sys.executable, "-c", BURN], check=True)

@pytest.fixture
def worker():  # a process that outlives the test, as Inductor's compile workers do
    child = subprocess.Popen(
        [sys.executable, "-c", BURN + "\\nprint('burnt', flush=True)\\ntime.sleep(60)"], stdout=subprocess.PIPE, text=True
    )
    yield child
    child.kill()
    child.wait()

def test_burns_cpu_in_a_live_subprocess(worker):
    assert worker.stdout.readline() == "burnt\\n"

def test_sleeps():
    time.sleep(0.6)  # wall time, no CPU: within the budget
"""


def test_a_session_over_the_budget_fails_under_xdist(tmp_path):
    (tmp_path / "conftest.py").write_text(_CONFTEST.format(tests=str(Path(__file__).parent)))
    (tmp_path / "test_burn.py").write_text(_TESTS)
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-o", "addopts=", "-n", "2", "-q"]
    done = subprocess.run(
        [*argv, "--rootdir", str(tmp_path), str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert "4 passed" in done.stdout and "over the time budget" in done.stdout
    over = [line for line in done.stdout.splitlines() if "for one test" in line]
    assert sorted(line.rsplit(": ", 1)[0] for line in over) == [
        "test test_burn.py::test_burns_cpu_here",
        "test test_burn.py::test_burns_cpu_in_a_live_subprocess",
        "test test_burn.py::test_burns_cpu_in_a_subprocess",
    ]
