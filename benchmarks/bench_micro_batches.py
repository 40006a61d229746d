"""Feature-cached micro-batches (``optim.micro_batches``): peak memory and speed of a whole training step of k = 8 micro-batches against the same step on the whole batch at once, and against one micro-batch alone.

One step of each family as training runs it (forward with every loss, backward, AdamW,
EMA and enqueue for the momentum family; the same step as ``bench_length_buckets.py``)
on one model, dropout off, the random state reset before each call. Sides:

- ``micro``: a batch of 8 b rows in ``micro_batches = 8`` (vlzoo's feature-cached step);
- ``whole``: the same 8 b rows at once (the peer: the same loss and gradients);
- ``one_micro``: b rows at once (what the memory goal compares with).

Peak memory is measured per side after a warm-up step (the optimizer state exists), two
ways: the peak of live tensors during the step (``common.measure_tensor_peak``: torch's
profiler on CPU, ``max_memory_allocated`` on CUDA; parameters, optimizer state and the
batch's inputs included), and the rise of the resident set above what was resident
before (``common.measure_peak``, which also counts freed heap memory glibc keeps; the
inputs are resident before and reported apart, ``input_mib``). Goal: ``micro`` within
1.2x of ``one_micro``.

    python benchmarks/bench_micro_batches.py --json /tmp/micro.json [--quick]
"""

from __future__ import annotations

from typing import Any

import torch
from bench_length_buckets import batch_of, config, training_loss, training_optimizer, training_step
from common import (
    MIB,
    arguments,
    device,
    first_value,
    measure_peak,
    measure_tensor_peak,
    summary,
    time_interleaved,
    train_without_dropout,
    write_json,
)

from vlzoo.models.builders import build_albef, build_blip, build_blip2, build_clip

K = 8
# (family, size, micro-batch rows b, timed repeats)
RUNS = [("clip", "tiny", 16, 4), ("albef", "tiny", 16, 4), ("blip", "tiny", 16, 4), ("blip2", "tiny", 16, 4),
        ("clip", "base", 2, 2), ("blip2", "base", 2, 2)]  # base ALBEF/BLIP: profiling their step takes too long on 2 cores
QUICK_RUNS = [("clip", "tiny", 4, 2), ("albef", "tiny", 4, 2)]
BUILDERS = {"clip": build_clip, "albef": build_albef, "blip": build_blip, "blip2": build_blip2}


def run(family: str, size: str, rows: int, repeats: int) -> dict[str, Any]:
    dev = device()
    cfg, _ = config(family, size)
    torch.manual_seed(0)
    model, tokenizer = BUILDERS[family](cfg)
    model = model.to(dev)
    train_without_dropout(model)
    optimizer = training_optimizer(model)
    small, big = (batch_of(n, cfg.vision.image_size, tokenizer, dev) for n in (rows, K * rows))

    def side(x: dict[str, torch.Tensor], micro_batches: int):
        def step() -> torch.Tensor:
            model.micro_batches = micro_batches
            if hasattr(model, "queue"):  # sides of two batch sizes share one queue: each writes from row 0
                model.queue.ptr.zero_()
            torch.manual_seed(0)  # the same MLM masks and hard negatives on every side
            return training_step(family, model, optimizer, x)
        return step

    losses = {}
    for k in (K, 1):  # forward only, before any side steps the optimizer: the same loss?
        model.micro_batches = k
        torch.manual_seed(0)
        with torch.no_grad():
            losses[k] = training_loss(family, model, big).item()
    sides = {"micro": side(big, K), "whole": side(big, 1), "one_micro": side(small, 1)}
    side(small, 1)()  # warm-up: the optimizer state exists before any measurement
    out: dict[str, Any] = {}
    for name, fn in sides.items():
        seen: dict[str, Any] = {}
        seen["memory"] = measure_peak(lambda fn=fn, seen=seen: seen.update(loss=first_value(fn())), dev)
        seen["tensor_memory"] = measure_tensor_peak(fn, dev)
        out[name] = seen
    times = time_interleaved(sides, warmup=0, repeats=repeats)
    for name, x in (("micro", big), ("whole", big), ("one_micro", small)):
        out[name].update(summary(times[name], len(x["pixels"])))
        out[name]["input_mib"] = sum(t.numel() * t.element_size() for t in x.values()) / MIB
    peak = {name: out[name]["memory"]["peak_mib"] for name in sides}
    tensors = {name: out[name]["tensor_memory"]["peak_mib"] for name in sides}
    out.update(family=family, size=size, micro_batch_rows=rows, micro_batches=K, loss_micro=losses[K],
               loss_whole=losses[1],
               tensors_vs_one_micro=tensors["micro"] / tensors["one_micro"],
               tensors_vs_whole=tensors["micro"] / tensors["whole"],
               memory_vs_one_micro=peak["micro"] / peak["one_micro"], memory_vs_whole=peak["micro"] / peak["whole"],
               speed_vs_whole=out["micro"]["per_s"] / out["whole"]["per_s"])
    return out


def main() -> None:
    args = arguments(__doc__.split("\n\n")[0])
    results = []
    for family, size, rows, repeats in QUICK_RUNS if args.quick else RUNS:
        r = run(family, size, rows, args.repeats or repeats)
        results.append(r)
        mib = {name: r[name]["memory"]["peak_mib"] for name in ("micro", "whole", "one_micro")}
        live = {name: r[name]["tensor_memory"]["peak_mib"] for name in ("micro", "whole", "one_micro")}
        print(f"{family} {size} {K} x {rows} rows: live tensors peak MiB micro {live['micro']:.0f}, whole "
              f"{live['whole']:.0f}, one micro-batch {live['one_micro']:.0f} -> {r['tensors_vs_one_micro']:.2f}x one "
              f"micro-batch, {r['tensors_vs_whole']:.2f}x whole; resident-set rise micro {mib['micro']:.0f}, whole "
              f"{mib['whole']:.0f}, one micro-batch {mib['one_micro']:.0f} -> {r['memory_vs_one_micro']:.2f}x one "
              f"micro-batch, {r['memory_vs_whole']:.2f}x whole; samples/s micro {r['micro']['per_s']:.2f}, whole "
              f"{r['whole']['per_s']:.2f} ({r['speed_vs_whole']:.2f}x); same weights, loss micro "
              f"{r['loss_micro']:.6f} whole {r['loss_whole']:.6f}", flush=True)
    write_json(args.json, {"benchmark": "micro_batches", "runs": results})


if __name__ == "__main__":
    main()
