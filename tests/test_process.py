"""The CPU thread policy: other processes' load measured from /proc/stat minus this
process's own CPU time, and the thread count that fits the cores they leave free."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from vlzoo import process
from vlzoo.process import CpuShare, ThreadChoice, choose_threads, parse_threads

needs_proc = pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="reads /proc/stat (Linux)")


def test_parse_threads():
    assert parse_threads(None, "x") is None and parse_threads("auto", "x") is None and parse_threads("0", "x") is None
    assert parse_threads("3", "--threads") == 3
    for bad in ("-1", "many", "1.5"):
        with pytest.raises(ValueError, match="--threads: expected a positive number of threads or 'auto'"):
            parse_threads(bad, "--threads")


def test_free_threads_leave_the_busy_cores_to_others(monkeypatch):
    share = CpuShare()
    share.cores = 4
    assert share.free_threads(0.0) == 4 and share.free_threads(1.2) == 3 and share.free_threads(2.6) == 1
    assert share.free_threads(9.0) == 1 and share.free_threads(None) == 4


@needs_proc
def test_a_busy_process_counts_as_other_load_and_our_own_work_does_not():
    share = CpuShare()
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:  # this process busy: not "other" load
        sum(range(10_000))
    own = share.sample()
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        share.sample()
        time.sleep(1.5)
        with_hog = share.sample()
    finally:
        hog.kill()
        hog.wait()
    assert own is not None and with_hog is not None
    assert with_hog > own + 0.5, (own, with_hog)  # the hog holds about one core


def test_a_requested_count_is_fixed_and_described():
    choice = choose_threads(2)
    assert choice == ThreadChoice(2, 2, None) and "fixed by --threads" in choice.describe()
    adaptive = choose_threads(None, probe_seconds=0.05)
    assert adaptive.fixed is None and 1 <= adaptive.start <= process.available_cores()
    assert "re-checked every 5 s while training" in adaptive.describe()


def test_prepare_environment_sets_the_starting_threads_unless_told(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    process.prepare_environment(ThreadChoice(None, 1, 1.0))
    assert os.environ["OMP_NUM_THREADS"] == "1"
    process.prepare_environment(ThreadChoice(None, 2, 0.0))
    assert os.environ["OMP_NUM_THREADS"] == "1"  # set before (here: by the first call) wins


def test_a_fit_starts_with_the_threads_asked_for():
    code = ("from vlzoo.cli import set_up_process\nset_up_process('fit', '1')\n"
            "import torch\nprint(torch.get_num_threads())")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "VLZOO_THREADS")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "1"


REUSE_FAULTS = """
import resource
from vlzoo.process import keep_freed_memory
kept = keep_freed_memory()
import numpy as np
def step():  # as a training step: 160 MiB of activations, written page by page, then all freed
    blocks = []
    for _ in range(20):
        a = np.empty(8 << 20, dtype=np.uint8); a[::4096] = 1; blocks.append(a)
    del blocks
step(); step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
step()
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
@pytest.mark.parametrize("keep", ["1", "0"])
def test_freed_memory_is_reused_without_page_faults(keep):
    """With the heap kept, a third "step" reuses the pages the first two touched (no
    faults); with VLZOO_KEEP_HEAP=0, glibc returns the freed top of its heap to the system
    after each step and the next one faults on thousands of its 40,960 pages (fewer than
    all of them where the kernel backs the heap with huge pages)."""
    env = {**os.environ, process.KEEP_HEAP_ENV: keep}
    out = subprocess.run([sys.executable, "-c", REUSE_FAULTS], capture_output=True, text=True, env=env, check=True)
    kept, faults = out.stdout.split()
    assert kept == str(keep == "1")
    assert (int(faults) < 400) if keep == "1" else (int(faults) > 2000)
