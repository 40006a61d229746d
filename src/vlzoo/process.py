"""How a vlzoo process shares the CPU with others: a thread policy that never spins
against other processes, and the process-wide quieting of known noise.

On a 2-core machine torch with 2 intra-op threads beside busy processes drops far below
its fair share: its OpenMP threads spin waiting for a core another process holds
(``benchmarks/bench_contention.py``). vlzoo therefore sizes torch's intra-op threads to
the cores that other processes leave free (:class:`CpuShare`: the machine's busy time
minus this process's own) when a command starts, and re-checks that every
:data:`CHECK_SECONDS` while training (:class:`vlzoo.progress.ThreadPolicy`). With one
thread nothing spins; with the cores free, spinning is what makes two threads fast, so
OpenMP's wait policy is left as it is (``OMP_WAIT_POLICY=PASSIVE`` cost a third of the idle
speed there).

``--threads N`` or ``VLZOO_THREADS=N`` fixes the count instead.

A training step frees and re-allocates the same activations every step. glibc returns
freed memory at the top of the heap to the system, and serves blocks of more than 128 KiB
to 32 MiB (a threshold it moves) with ``mmap``; the next step then takes a page fault on
every 4 KiB page it touches again. :func:`keep_freed_memory` keeps such memory in the
process (``VLZOO_KEEP_HEAP=0`` turns it off). This module imports neither torch nor
Lightning: it runs before them.
"""

from __future__ import annotations

import ctypes
import os
import time
import warnings
from dataclasses import dataclass

THREADS_ENV = "VLZOO_THREADS"
CHECK_SECONDS = 5.0  # how often a training run re-checks the free cores


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _busy_and_total_ticks() -> tuple[int, int] | None:
    """(busy, total) clock ticks of all CPUs since boot, from ``/proc/stat``; None elsewhere."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]) - idle, sum(fields[:8])


def _own_cpu_seconds() -> float:
    """CPU seconds this process (all its threads) and its finished children used."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class CpuShare:
    """Cores used by *other* processes, measured between two calls of :meth:`sample`:
    the machine's busy time (``/proc/stat``) minus this process's own CPU time."""

    def __init__(self) -> None:
        self.cores = available_cores()
        self._last = self._now()

    @staticmethod
    def _now() -> tuple[float, tuple[int, int] | None, float]:
        return time.monotonic(), _busy_and_total_ticks(), _own_cpu_seconds()

    def sample(self) -> float | None:
        """Cores other processes kept busy since the last sample (None where unknown)."""
        (t0, ticks0, own0), (t1, ticks1, own1) = self._last, self._now()
        self._last = (t1, ticks1, own1)
        if ticks0 is None or ticks1 is None or ticks1[1] <= ticks0[1] or t1 <= t0:
            return None
        machine_cpus = os.cpu_count() or self.cores
        busy_cores = machine_cpus * (ticks1[0] - ticks0[0]) / (ticks1[1] - ticks0[1])
        return max(0.0, busy_cores - (own1 - own0) / (t1 - t0))

    def free_threads(self, others: float | None) -> int:
        """Threads that fit on the cores other processes leave free (at least 1)."""
        if others is None:
            return self.cores
        return max(1, min(self.cores, int(self.cores - others + 0.5)))


@dataclass(frozen=True)
class ThreadChoice:
    """The thread policy of this process: a fixed count (``--threads`` / ``VLZOO_THREADS``)
    or adaptive (None), and the count to start with."""

    fixed: int | None
    start: int
    others: float | None

    def describe(self) -> str:
        if self.fixed is not None:
            return f"{self.fixed} CPU thread(s), fixed by --threads / {THREADS_ENV}"
        busy = "unknown" if self.others is None else f"{self.others:.1f}"
        return (f"{self.start} CPU thread(s) of {available_cores()} cores ({busy} busy with other processes; "
                f"re-checked every {CHECK_SECONDS:.0f} s while training; --threads N or {THREADS_ENV}=N fixes it)")


def parse_threads(value: str | None, where: str) -> int | None:
    """A thread count from ``--threads`` or the environment; 0 / ``auto`` / empty: adaptive."""
    if value is None or value.strip().lower() in ("", "0", "auto"):
        return None
    try:
        count = int(value)
    except ValueError:
        count = -1
    if count < 1:
        raise ValueError(f"{where}: expected a positive number of threads or 'auto', got {value!r}")
    return count


def choose_threads(requested: int | None, probe_seconds: float = 0.2) -> ThreadChoice:
    """The thread policy: ``requested`` when given, else the cores other processes leave
    free, measured over ``probe_seconds``."""
    if requested is not None:
        return ThreadChoice(requested, requested, None)
    share = CpuShare()
    time.sleep(probe_seconds)
    others = share.sample()
    return ThreadChoice(None, share.free_threads(others), others)


def prepare_environment(choice: ThreadChoice) -> None:
    """Set before torch is imported: OpenMP starts with ``choice.start`` threads (unless
    ``OMP_NUM_THREADS`` is set)."""
    os.environ.setdefault("OMP_NUM_THREADS", str(choice.start))
    os.environ.setdefault("MKL_NUM_THREADS", str(choice.start))


KEEP_HEAP_ENV = "VLZOO_KEEP_HEAP"
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
TRIM_THRESHOLD = 1 << 30  # free heap kept at the top before any is returned to the system
MMAP_THRESHOLD = 32 << 20  # glibc's largest: every smaller block comes from the reusable heap


def keep_freed_memory() -> bool:
    """Keep freed memory for reuse instead of returning it to the system after every step
    (glibc's ``mallopt``): no page faults on re-touching it. The resident set then stays at
    its high-water mark, which a training step reaches anyway. Returns whether it was set:
    False where the C library is not glibc (macOS, Windows, musl) or ``VLZOO_KEEP_HEAP=0``.

    Measured on this project's 2-core CPU (``benchmarks/bench_steps.py``): a base-size
    BLIP-2 stage-1 step took 100,000-200,000 page faults and 13-14 s without it, none and
    11.6-12.2 s with it."""
    if os.environ.get(KEEP_HEAP_ENV, "1") == "0":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)) and bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))


# Noise every run would print, filtered once for the process: Lightning's tips and
# warnings about choices vlzoo makes on purpose. Each pattern is a message vlzoo has seen.
KNOWN_NOISE = (
    r".*args parameter is intended to run from within Python.*",  # vlzoo finetune passes args on purpose
    r".*The '(train|val|test|predict)_dataloader' does not have many workers.*",  # num_workers 0 is the CPU default
    r".*Checkpoint directory .* exists and is not empty.*",  # resume writes into its own run directory
    r".*The number of training batches .* is smaller than the logging interval.*",
    r".*`isinstance\(treespec, LeafSpec\)` is deprecated.*",  # Lightning on torch >= 2.9
    r".*LeafSpec.* is deprecated.*",
    r".*pkg_resources is deprecated.*",
    r".*TensorBoard.*tensorboardX.*",
    r".*The dirpath has changed from .* won't be reloaded.*",  # validate/test with another run's checkpoint
)
NOISY_LOG_LINES = (
    "Tip: For seamless cloud logging",  # Lightning's advertisement, once per Trainer
    "will override existing callbacks passed to Trainer",  # the task's own callbacks, on purpose
    "`weights_only` was not set",
    "Seed set to ",  # the seed is in the run's config.yaml
    "Detected KeyboardInterrupt, attempting graceful shutdown",  # vlzoo says what was saved instead
)


class _DropNoise:
    """A logging filter that drops the records of :data:`NOISY_LOG_LINES`."""

    def filter(self, record) -> bool:
        message = record.getMessage()
        return not any(marker in message for marker in NOISY_LOG_LINES)


_QUIETED = False


def quiet_known_noise() -> None:
    """Filter the known warnings, once, for the process (before torch and Lightning load)."""
    global _QUIETED
    if _QUIETED:
        return
    for pattern in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=pattern)
    _QUIETED = True


def quiet_lightning_logs() -> None:
    """Drop Lightning's tips and known-noise log lines (after Lightning is imported: its
    handlers are the ones that print)."""
    import logging

    for name in ("lightning.pytorch", "lightning.fabric", ""):
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, _DropNoise) for f in handler.filters):
                handler.addFilter(_DropNoise())
