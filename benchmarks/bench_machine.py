"""The machine the benchmarks run on, and its measured matmul peak (fp32 and bf16).

    python benchmarks/bench_machine.py --json /tmp/machine.json
"""

from __future__ import annotations

import torch
from common import arguments, device, machine, matmul_peak, write_json


def main() -> None:
    args = arguments(__doc__.split("\n\n")[0])
    dev = device()
    seconds = 0.5 if args.quick else 1.0
    peaks = {name: matmul_peak(dtype, dev, seconds=seconds)
             for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    for name, peak in peaks.items():
        print(f"{name} matmul peak: {peak['flop_s'] / 1e9:.1f} GFLOP/s", flush=True)
    write_json(args.json, {"benchmark": "machine", "machine": machine(), "matmul_peak": peaks})


if __name__ == "__main__":
    main()
