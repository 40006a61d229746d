"""Shared helpers of the side-by-side benchmarks (``benchmarks/bench_*.py``).

Timing: each side is warmed up, then timed in alternation (vlzoo, peer, peer, vlzoo,
...) so that a change in the machine's load during the run hits both alike; figures
are medians over the timed repeats, ratios medians of back-to-back pairs.

Peak memory on CPU is measured in-process, one side at a time: freed heap memory is
handed back to the OS (``malloc_trim``), the kernel's resident-set high-water mark is
reset (``/proc/self/clear_refs``, value 5), the side's warm-up runs, and its peak is
the new high-water mark minus the resident set before it (what the call allocates:
gradients, optimizer state, activations; not the weights, resident before). On CUDA,
``torch.cuda.max_memory_allocated`` after a reset of the peak statistics.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch

from vlzoo.budget import flop_counter_with_attention
from vlzoo.process import keep_freed_memory

MIB = 2**20


# ------------------------------------------------------------------------ arguments
def parser(description: str) -> argparse.ArgumentParser:
    """``--json OUT`` (where the figures go) and ``--quick`` (small sizes and repeats)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--json", type=Path, required=True, help="write the figures here")
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats (development)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per side (default: the script's)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1: see run_all.py)")
    return p


def arguments(description: str) -> argparse.Namespace:
    """Parse the common arguments, apply ``--threads`` and keep freed memory for reuse
    as vlzoo's commands do (:func:`vlzoo.process.keep_freed_memory`; both sides alike)."""
    args = parser(description).parse_args()
    set_threads(args.threads)
    keep_freed_memory()
    return args


def run_benchmarks(description: str, benchmark: str, peer: str, runs: list[tuple], quick_runs: list[tuple],
                   run: Callable[..., dict[str, Any]]) -> None:
    """The common ``main``: ``run(*spec)`` for each spec ``(a, b, batch, repeats, ...)`` of
    ``runs`` (``quick_runs`` with ``--quick``; ``--repeats`` overrides), one line per
    ratio printed, all results written to ``--json``."""
    args = arguments(description)
    results = []
    for spec in quick_runs if args.quick else runs:
        spec = (*spec[:3], args.repeats or spec[3], *spec[4:])
        result = run(*spec)
        results.append(result)
        print(f"{spec[0]} {spec[1]} batch {spec[2]}: vlzoo {result['vlzoo']['per_s']:.2f}/s, {peer} "
              f"{result[peer]['per_s']:.2f}/s, ratio {result['ratio']['ratio']:.3f}", flush=True)
    write_json(args.json, {"benchmark": benchmark, "runs": results})


def write_json(path: Path, data: dict[str, Any]) -> None:
    """``data`` as indented JSON at ``path`` (parents created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def set_threads(threads: int) -> None:
    """Intra-op threads of this process (both sides run with the same)."""
    torch.set_num_threads(threads)


def device() -> torch.device:
    """CUDA when there is a GPU, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize() -> None:
    """Wait for queued GPU work (timing); nothing on CPU."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def autocast(dtype: str, dev: torch.device) -> AbstractContextManager:
    """bf16 autocast for ``dtype == "bf16"``, nothing for ``"fp32"``."""
    if dtype == "fp32":
        return nullcontext()
    return torch.autocast(dev.type, dtype=torch.bfloat16)


# ------------------------------------------------------------------------ timing
def time_calls(fn: Callable[[], Any], calls: int = 1) -> float:
    """Seconds per call of ``fn`` over ``calls`` calls."""
    synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize()
    return (time.perf_counter() - start) / calls


def time_interleaved(fns: dict[str, Callable[[], Any]], warmup: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each function: ``warmup`` untimed calls each, then
    ``repeats`` timed calls each, in an order that alternates (ABBA...) so that drift
    in the machine's load falls on every side alike."""
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            times[name].append(time_calls(fns[name]))
    return times


def summary(seconds: list[float], items: int) -> dict[str, Any]:
    """Median items/s over repeats, with the spread (min, max) and the raw seconds."""
    rates = [items / s for s in seconds]
    return {"per_s": statistics.median(rates), "min_per_s": min(rates), "max_per_s": max(rates),
            "median_s": statistics.median(seconds), "repeats": len(seconds), "seconds": seconds}


def ratio(ours: list[float], theirs: list[float]) -> dict[str, Any]:
    """Speed ratio vlzoo / peer from seconds per call: median of the paired per-repeat
    ratios (each pair timed back to back), their min and max, and the pairs."""
    pairs = [t / o for o, t in zip(ours, theirs, strict=True)]
    return {"ratio": statistics.median(pairs), "min": min(pairs), "max": max(pairs), "pairs": pairs}


# ------------------------------------------------------------------------ memory
def _malloc_trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024 / MIB
    raise KeyError(key)


def measure_peak(run: Callable[[], Any], dev: torch.device) -> dict[str, Any]:
    """Peak memory of ``run()`` (build a side and step it) above what was resident
    before: CPU resident set (``VmHWM`` after a reset) or CUDA allocated bytes."""
    _malloc_trim()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / MIB
        run()
        synchronize()
        return {"peak_mib": torch.cuda.max_memory_allocated() / MIB - before, "kind": "cuda_max_allocated"}
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the resident-set high-water mark to the current resident set
    before = _status_mib("VmRSS")
    run()
    return {"peak_mib": _status_mib("VmHWM") - before, "kind": "cpu_rss_high_water"}


def measure_tensor_peak(run: Callable[[], Any], dev: torch.device) -> dict[str, Any]:
    """Peak bytes of live tensors during ``run()`` (parameters, optimizer state, inputs,
    activations, gradients, temporaries), from torch's profiler memory timeline on CPU
    (a private API of ``torch.profiler``; allocator-level, so it has none of the heap's
    fragmentation that the resident set shows) and ``max_memory_allocated`` on CUDA."""
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        run()
        synchronize()
        return {"peak_mib": torch.cuda.max_memory_allocated() / MIB, "kind": "cuda_max_allocated"}
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        run()
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(dev)
    return {"peak_mib": max(sum(row) for row in sizes) / MIB, "kind": "cpu_live_tensors"}


# ------------------------------------------------------------------------ FLOPs
def matmul_peak(dtype: torch.dtype, dev: torch.device, n: int = 1024, seconds: float = 1.0) -> dict[str, float]:
    """Measured matmul FLOP/s of this machine: the best of repeated ``torch.mm`` of two
    n x n matrices over about ``seconds``, for both operand layouts (``a @ b`` and
    ``a @ b.T``, as ``nn.Linear`` computes: on CPUs without native bf16, PyTorch's bf16
    kernel is ten times faster for the latter). Returns the best and each layout's."""
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    out = {}
    for layout, right in (("nn", b), ("nt", b.T)):
        torch.mm(a, right)  # warm-up
        best, deadline = 0.0, time.perf_counter() + seconds
        while time.perf_counter() < deadline or best == 0.0:
            best = max(best, 2 * n**3 / time_calls(lambda right=right: torch.mm(a, right)))
        out[f"{layout}_flop_s"] = best
    out["flop_s"] = max(out.values())
    return out


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """What the figures were measured on: CPU, cores, threads, GPU, library versions, load."""
    import open_clip
    import transformers

    info: dict[str, Any] = {
        "cpu": cpu_model(), "logical_cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "open_clip": open_clip.__version__, "platform": platform.platform(),
        "load_average_1_5_15": list(os.getloadavg()),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def train_without_dropout(*modules: torch.nn.Module) -> None:
    """Train mode (as in a training step) with every dropout at p = 0, so that both sides
    compute the same deterministic function."""
    for module in modules:
        module.train()
        for m in module.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0


def captions(count: int, seed: int = 0) -> list[str]:
    """``count`` captions of random shapes scenes (one per scene, 5 to 24 words), a
    stand-in for web captions of about COCO's length."""
    import numpy as np

    from vlzoo.data.shapes import captions_for, sample_scene

    rng = np.random.default_rng(seed)
    return [captions_for(sample_scene(rng))[int(rng.integers(5))] for _ in range(count)]


def adamw(model: torch.nn.Module, lr: float = 1e-5, weight_decay: float = 0.1) -> torch.optim.AdamW:
    """The optimizer both sides train with: AdamW, no decay on 0-/1-d parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr)


def first_value(output: Any) -> Any:
    """A JSON-able summary of a step's output (a loss, or a tensor's first entries)."""
    if isinstance(output, torch.Tensor):
        flat = output.detach().float().flatten()
        return flat.item() if flat.numel() == 1 else flat[:8].tolist()
    return output


def compare(sides: dict[str, Callable[[], Any]], items: int, repeats: int, dev: torch.device,
            warmup: int = 1, memory: bool | set[str] = True) -> dict[str, Any]:
    """Benchmark callables that compute the same thing (the first is vlzoo, the second
    the peer): per side, ``warmup`` (>= 1) untimed calls — the first counted by the
    FLOP counter and its output kept, all under the peak-memory measurement (``memory``:
    for every side, none, or the named ones) — then ``repeats`` alternating timed calls.
    ``items``: samples per call."""
    out: dict[str, Any] = {}
    for name, fn in sides.items():
        seen: dict[str, Any] = {}

        def prime(fn: Callable[[], Any] = fn, seen: dict[str, Any] = seen) -> None:
            with flop_counter_with_attention() as counter:
                seen["output"] = first_value(fn())
            seen["flops"] = int(counter.get_total_flops())
            for _ in range(warmup - 1):
                fn()

        measured = memory if isinstance(memory, bool) else name in memory
        seen["memory"] = measure_peak(prime, dev) if measured else prime()
        out[name] = seen
    times = time_interleaved(sides, warmup=0, repeats=repeats)
    for name in sides:
        out[name].update(summary(times[name], items))
        out[name]["achieved_gflop_s"] = out[name]["flops"] / out[name]["median_s"] / 1e9
    ours, theirs = list(sides)[:2]
    out["ratio"] = ratio(times[ours], times[theirs])
    return out


def parameter_mib(model: torch.nn.Module) -> float:
    """Bytes of the model's distinct parameters and buffers, in MiB."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values()) / MIB
