"""Training speed on a busy machine: vlzoo's CPU thread policy against torch's default.

A shapes CLIP training step (the tiny CLIP of ``zoo_configs/models/clip/shapes-tiny.yaml``,
64 px, batch 64, AdamW) runs for ``--seconds`` alone, then beside 1 and 2 busy processes
(each a Python loop that holds one core). Each case runs in a fresh process, once with
torch's defaults (as many intra-op threads as cores, OpenMP's default spin-wait: the
peer) and once with vlzoo's policy (``vlzoo.process``: threads sized to the cores other
processes leave free, re-checked every 5 s), the two alternating,
each case run 3 times (the mean is shown; this machine varies by +-15 % between
identical runs). It prints samples/s per case and the ratio to the
idle speed.

    python benchmarks/bench_contention.py --json /tmp/contention.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
POLICIES = ("torch default", "vlzoo")


def worker(policy: str, seconds: float) -> None:
    """Train for ``seconds`` (after 3 s of warm-up) and print samples/s as JSON."""
    share = None
    if policy == "vlzoo":
        from vlzoo.process import CHECK_SECONDS, CpuShare, choose_threads, prepare_environment

        prepare_environment(choose_threads(None))
        share = CpuShare()
    import torch
    import yaml

    from vlzoo.config import CLIPConfig, as_config
    from vlzoo.data.shapes import caption_corpus
    from vlzoo.losses import clip_loss
    from vlzoo.models.builders import build_clip

    torch.manual_seed(0)
    config = yaml.safe_load((ROOT / "zoo_configs/models/clip/shapes-tiny.yaml").read_text())
    model_config = as_config(config["model"]["init_args"]["model"], CLIPConfig, "clip/shapes-tiny.yaml: model")
    model, tokenizer = build_clip(model_config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = 64
    images = torch.randn(batch, 3, 64, 64)
    text = tokenizer(caption_corpus(size=20)[:batch])["input_ids"]
    threads_seen = set()
    done, start, last_check = 0, None, time.monotonic()
    begin = time.monotonic()
    while True:
        now = time.monotonic()
        if start is None and now - begin >= 3.0:
            start, done = now, 0
        if start is not None and now - start >= seconds:
            break
        if share is not None and now - last_check >= CHECK_SECONDS:  # as vlzoo.progress.ThreadPolicy does
            threads = share.free_threads(share.sample())
            if threads != torch.get_num_threads():
                torch.set_num_threads(threads)
            last_check = now
        threads_seen.add(torch.get_num_threads())
        out = model(images, text)
        loss = clip_loss(out.image_embeds, out.text_embeds, out.logit_scale)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        done += batch
    print(json.dumps({"samples_per_s": done / (time.monotonic() - start), "threads": sorted(threads_seen)}))


def busy() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def run_case(policy: str, load: int, seconds: float) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS",
                                                             "VLZOO_THREADS")}
    hogs = [busy() for _ in range(load)]
    try:
        time.sleep(1.0)
        out = subprocess.run([sys.executable, __file__, "--worker", policy, str(seconds)], env=env, check=True,
                             capture_output=True, text=True)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    return json.loads(out.stdout.strip().splitlines()[-1])


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def main() -> None:
    from common import arguments, machine, write_json

    args = arguments(__doc__.split("\n\n")[0])
    seconds = 5.0 if args.quick else 12.0
    print(f"load average before: {load_average()} (cores: {os.cpu_count()})", flush=True)
    results: dict[int, dict[str, dict]] = {}
    for load in (0, 1, 2):  # each case 3 times, alternating who goes first; the mean
        runs = {policy: [] for policy in POLICIES}
        for order in (POLICIES, POLICIES[::-1], POLICIES):
            for policy in order:
                runs[policy].append(run_case(policy, load, seconds))
        results[load] = {p: {"samples_per_s": sum(r["samples_per_s"] for r in rs) / len(rs),
                             "runs": [r["samples_per_s"] for r in rs],
                             "threads": sorted({t for r in rs for t in r["threads"]})} for p, rs in runs.items()}
    idle = {policy: results[0][policy]["samples_per_s"] for policy in POLICIES}
    print(f"| busy processes | {' | '.join(f'{p} samples/s (x idle)' for p in POLICIES)} | vlzoo / torch default "
          "| vlzoo threads |")
    print("|---|---|---|---|---|")
    rows = []
    for load, by_policy in results.items():
        cells = [f"{by_policy[p]['samples_per_s']:.0f} ({by_policy[p]['samples_per_s'] / idle[p]:.2f})"
                 for p in POLICIES]
        ratio = by_policy["vlzoo"]["samples_per_s"] / by_policy["torch default"]["samples_per_s"]
        print(f"| {load} | {' | '.join(cells)} | {ratio:.2f} | {by_policy['vlzoo']['threads']} |")
        rows.append({"busy_processes": load, **{p: by_policy[p] for p in POLICIES},
                     "vlzoo_vs_idle": by_policy["vlzoo"]["samples_per_s"] / idle["vlzoo"],
                     "torch_default_vs_idle": by_policy["torch default"]["samples_per_s"] / idle["torch default"],
                     "vlzoo_vs_torch_default": ratio})
    print(f"load average after: {load_average()}", flush=True)
    write_json(args.json, {"benchmark": "contention", "machine": machine(), "seconds": seconds, "rows": rows})


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        worker(sys.argv[2], float(sys.argv[3]))
    else:
        main()
