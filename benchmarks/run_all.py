"""Run every side-by-side benchmark, each in its own process, and write
``DIR/results.json`` and ``DIR/results.md``.

    python benchmarks/run_all.py --out DIR [--quick] [--threads N]

Benchmarks (``benchmarks/bench_*.py``, each also runnable alone with ``--json OUT``):
the machine and its matmul peak; the CLIP training step against open_clip; whole training steps of
ALBEF, BLIP and BLIP-2 stage 1 against transformers' modules under the same step and losses
(``bench_steps.py``); BLIP ITC+ITM
forward and captioning LM forward+backward against transformers; the BLIP-2 Q-Former
forward+backward against transformers; two-stage retrieval evaluation time; the BLIP-2
stage-1 frozen-feature cache (``blip2_feature_cache.py``); training speed beside busy processes
(``bench_contention.py``, vlzoo's thread policy against torch's default); whole training steps of
every family with text passes grouped by length against padded ones (``bench_length_buckets.py``). Per-benchmark JSON and logs
go to ``DIR/parts/`` and ``DIR/logs/``.

Every process runs with ``--threads`` intra-op threads (default 1): on a small machine
shared with other jobs, a second thread whose core is taken makes every parallel
region wait for it, and step times swing by an order of magnitude.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
FEATURE_CACHE = ["--vision", "vit_small_patch16_224", "--image-size", "224", "--train-size", "32",
                 "--batch-size", "16", "--steps", "2", "--repeats", "2"]
FEATURE_CACHE_QUICK = ["--train-size", "32", "--batch-size", "16", "--steps", "2", "--repeats", "1"]
BENCHMARKS = ("machine", "clip", "steps", "blip", "qformer", "retrieval", "feature_cache", "contention",
              "length_buckets")
# ratios key -> (benchmark, how to label one of its runs, run filter)
RATIOS = {
    "clip_train_vs_open_clip": ("clip", lambda r: f"{r['config']} {r['dtype']} b{r['batch']}", lambda r: True),
    "train_step_vs_transformers": ("steps", lambda r: f"{r['family']} {r['size']} b{r['batch']}", lambda r: True),
    "blip_itm_vs_transformers": ("blip", lambda r: f"{r['size']} b{r['batch']}", lambda r: r["task"] == "itm"),
    "blip_lm_vs_transformers": ("blip", lambda r: f"{r['size']} b{r['batch']}", lambda r: r["task"] == "lm"),
    "blip_caption_vs_transformers": ("blip", lambda r: f"{r['size']} b{r['batch']}",
                                     lambda r: r["task"] == "caption"),
    "qformer_vs_transformers": ("qformer", lambda r: f"{r['pass_']} {r['size']} b{r['batch']}", lambda r: True),
}
# runs whose MFU this adds from the machine benchmark's peak (bench_steps.py measures its own beside each run)
PEERS = {"clip": "open_clip", "blip": "transformers", "qformer": "transformers", "length_buckets": "padded"}


def command(name: str, out: Path, args: argparse.Namespace) -> list[str]:
    """The command line of benchmark ``name`` writing its JSON to ``out``."""
    threads = ["--threads", str(args.threads)]
    if name == "feature_cache":
        extra = FEATURE_CACHE_QUICK if args.quick else FEATURE_CACHE
        return [sys.executable, str(HERE / "blip2_feature_cache.py"), "--json", str(out), *threads, *extra]
    return [sys.executable, str(HERE / f"bench_{name}.py"), "--json", str(out), *threads,
            *(["--quick"] if args.quick else [])]


def run_benchmark(name: str, directory: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Run one benchmark in a subprocess; its JSON, or the error, plus its wall time."""
    out, log = directory / "parts" / f"{name}.json", directory / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"[run_all] {name} ...", flush=True)
    start = time.perf_counter()
    with log.open("w") as f:
        code = subprocess.run(command(name, out, args), stdout=f, stderr=subprocess.STDOUT, cwd=HERE.parent).returncode
    wall = time.perf_counter() - start
    print(f"[run_all] {name}: {'ok' if code == 0 else f'FAILED ({code}), see {log}'} in {wall:.0f} s", flush=True)
    if code != 0 or not out.is_file():
        return {"error": f"exit code {code}; log: {log}", "wall_s": wall}
    return {**json.loads(out.read_text()), "wall_s": wall}


def ratios(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per ``ratios`` key, one entry per run (size, dtype, batch), never pooled across
    runs: ``ratios`` the run's median of its paired repeats (vlzoo speed / peer speed),
    ``ratios_detail`` with its min, max and pairs."""
    out: dict[str, dict[str, Any]] = {"ratios": {}, "ratios_detail": {}}
    for key, (bench, label, keep) in RATIOS.items():
        runs = [r for r in results[bench].get("runs", []) if keep(r)]
        out["ratios"][key] = {label(r): r["ratio"]["ratio"] for r in runs}
        out["ratios_detail"][key] = {label(r): r["ratio"] for r in runs}
    return out


def add_utilisation(results: dict[str, Any]) -> None:
    """Model FLOPs utilisation of every timed side against the matmul peak of its dtype."""
    peaks = results["machine"].get("matmul_peak", {})
    for bench, peer in PEERS.items():
        for run in results[bench].get("runs", []):
            peak = peaks.get(run.get("dtype", "fp32"), {}).get("flop_s")
            for side in ("vlzoo", peer, "vlzoo_pad77"):
                if side in run and peak:
                    run[side]["mfu"] = run[side]["achieved_gflop_s"] * 1e9 / peak


# --------------------------------------------------------------------------- markdown
def _f(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _ratio(r: dict[str, float]) -> str:
    return f"**{r['ratio']:.2f}** ({r['min']:.2f}–{r['max']:.2f})"


def _mem(side: dict[str, Any]) -> str:
    return _f((side.get("memory") or {}).get("peak_mib"), 0)


def machine_md(results: dict[str, Any]) -> list[str]:
    m = results["machine"].get("machine", {})
    peaks = results["machine"].get("matmul_peak", {})
    peak = ", ".join(f"{k} {v['flop_s'] / 1e9:.1f} GFLOP/s (a@b {v['nn_flop_s'] / 1e9:.1f}, a@b.T "
                     f"{v['nt_flop_s'] / 1e9:.1f})" for k, v in peaks.items())
    return [
        f"- CPU: {m.get('cpu')} ({m.get('usable_cores')} usable cores of {m.get('logical_cores')}; "
        f"`{m.get('cpu_capability')}`), {m.get('torch_threads')} intra-op thread(s) per process"
        + (f"; GPU: {m['gpu']}" if m.get("gpu") else ""),
        f"- torch {m.get('torch')}, transformers {m.get('transformers')}, open_clip {m.get('open_clip')}, "
        f"Python {m.get('python')}",
        f"- measured matmul peak (1024 x 1024 `torch.mm`, best of ~1 s): {peak}",
        f"- load average when the run started / ended: {results['load_average_start']} / "
        f"{results['load_average_end']} (other jobs share this machine when it is above 0)",
        f"- wall time of the whole run: {results['wall_s']:.0f} s",
    ]


def ratios_md(results: dict[str, Any]) -> list[str]:
    lines = ["| `ratios` key (vlzoo speed / peer speed) | run | median of its pairs (min–max) |", "|---|---|---|"]
    for key, runs in results["ratios_detail"].items():
        lines += [f"| `{key}` | {label} | {_ratio(r)} |" for label, r in runs.items()]
    return lines


def clip_md(results: dict[str, Any]) -> list[str]:
    lines = ["| config | dtype | batch | text tokens vlzoo / open_clip | vlzoo samples/s | open_clip samples/s | "
             "ratio | peak MiB vlzoo / open_clip | GFLOP/step vlzoo / open_clip | MFU vlzoo / open_clip | "
             "first-step loss diff |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["clip"].get("runs", []):
        v, o = r["vlzoo"], r["open_clip"]
        lines.append(
            f"| {r['config']} | {r['dtype']} | {r['batch']} | {r['text_tokens']['vlzoo']} / "
            f"{r['text_tokens']['open_clip']} | {_f(v['per_s'])} | {_f(o['per_s'])} | {_ratio(r['ratio'])} | "
            f"{_mem(v)} / {_mem(o)} | {v['flops'] / 1e9:.1f} / {o['flops'] / 1e9:.1f} | "
            f"{_f(v.get('mfu'), 3)} / {_f(o.get('mfu'), 3)} | {r['first_loss_abs_diff']:.1e} |")
        if "control_ratio" in r:
            c = r["vlzoo_pad77"]
            lines.append(f"| {r['config']} control: vlzoo fed open_clip's 77-token ids | {r['dtype']} | {r['batch']} "
                         f"| 77 / 77 | {_f(c['per_s'])} | {_f(o['per_s'])} | {_ratio(r['control_ratio'])} | – | "
                         f"{c['flops'] / 1e9:.1f} / {o['flops'] / 1e9:.1f} | {_f(c.get('mfu'), 3)} / "
                         f"{_f(o.get('mfu'), 3)} | – |")
    return lines


def peer_md(results: dict[str, Any], bench: str, label, peer: str = "transformers") -> list[str]:
    """One row per run of ``bench`` (never pooled): vlzoo against ``peer``."""
    lines = [f"| run | batch | vlzoo samples/s | {peer} samples/s | ratio | peak MiB vlzoo / {peer} | "
             f"GFLOP/call vlzoo / {peer} | MFU vlzoo / {peer} | output diff |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results[bench].get("runs", []):
        v, t = r["vlzoo"], r[peer]
        diff = r.get("output_max_abs_diff", r.get("first_loss_abs_diff"))
        lines.append(f"| {label(r)} | {r['batch']} | {_f(v['per_s'])} | {_f(t['per_s'])} | {_ratio(r['ratio'])} | "
                     f"{_mem(v)} / {_mem(t)} | {v['flops'] / 1e9:.2f} / {t['flops'] / 1e9:.2f} | {_f(v.get('mfu'), 3)} / "
                     f"{_f(t.get('mfu'), 3)} | {'–' if diff is None else f'{diff:.1e}'} |")
    return lines


def retrieval_md(results: dict[str, Any]) -> list[str]:
    r, c = results["retrieval"], results["feature_cache"]
    lines = []
    if "evaluate_s" in r:
        lines += [f"Two-stage retrieval, BLIP at the shapes-tiny sizes, {r['images']} images x {r['captions']} "
                  f"captions, k = {r['k']}: image pass {r['image_pass_s']:.2f} s, evaluation {r['evaluate_s']:.2f} s "
                  f"({r['itm_pairs']} ITM pairs, {r['itm_pairs_per_s']:.0f} pairs/s; median of {r['repeats']})."]
    if "speedup" in c:
        lines += ["", f"BLIP-2 stage-1 frozen-feature cache ({c['vision']} at {c['image_size']} px, batch "
                  f"{c['batch']}): {c['uncached_per_s']:.1f} -> {c['cached_per_s']:.1f} samples/s, "
                  f"**{c['speedup']:.2f}x** (median of {c['repeats']} windows of {c['steps']} steps)."]
    return lines


def contention_md(results: dict[str, Any]) -> list[str]:
    lines = ["| busy processes | torch default samples/s (x idle) | vlzoo samples/s (x idle) | vlzoo / torch default "
             "| vlzoo threads |", "|---|---|---|---|---|"]
    for r in results["contention"].get("rows", []):
        d, v = r["torch default"], r["vlzoo"]
        lines.append(f"| {r['busy_processes']} | {d['samples_per_s']:.0f} ({r['torch_default_vs_idle']:.2f}) | "
                     f"{v['samples_per_s']:.0f} ({r['vlzoo_vs_idle']:.2f}) | {r['vlzoo_vs_torch_default']:.2f} | "
                     f"{v['threads']} |")
    return lines


def markdown(results: dict[str, Any]) -> str:
    """``results.md``: the machine, the ratios, and one table per benchmark."""
    parts = ["# vlzoo benchmarks", "", *machine_md(results), "", "## Ratios", "", *ratios_md(results), "",
             "## CLIP training step vs open_clip", "", *clip_md(results), "",
             "## Whole training steps of ALBEF, BLIP and BLIP-2 vs transformers' modules under the same step", "",
             *peer_md(results, "steps", lambda r: f"{r['family']} {r['size']}"), "",
             "## BLIP vs transformers", "", *peer_md(results, "blip", lambda r: f"{r['task']} {r['size']}"), "",
             "## BLIP-2 Q-Former vs transformers", "",
             *peer_md(results, "qformer", lambda r: f"{r['pass_']} {r['size']}"), "",
             "## Retrieval evaluation and the frozen-feature cache", "", *retrieval_md(results), "",
             "## Whole training steps: text passes in 4 length buckets vs padded", "",
             *peer_md(results, "length_buckets",
                      lambda r: f"{r['family']} {r['size']} ({r['real_text_fraction']:.0%} real text)", "padded"), "",
             "## Training beside busy processes: vlzoo's thread policy vs torch's default", "",
             *contention_md(results), "",
             "## Method", "", *METHOD, ""]
    errors = [f"- {name}: {results[name]['error']}" for name in BENCHMARKS if "error" in results[name]]
    if errors:
        parts += ["## Failed", "", *errors, ""]
    return "\n".join(parts)


METHOD = [
    "- Each benchmark runs in its own process. Within it, vlzoo and the peer hold identical weights "
    "(converted from the peer's model) and get identical inputs; each side is warmed up by one call (whose "
    "output is kept, to check both compute the same thing, and whose FLOPs `torch.utils.flop_counter` counts), "
    "then timed calls alternate between the sides (ABBA...) so that load from other jobs falls on both.",
    "- samples/s: median over the timed calls; a run's ratio: median of its per-pair ratios (one call of each "
    "side, back to back), with their min–max; `ratios`: that figure for every run of a comparison, one per "
    "size, dtype and batch (never pooled across them).",
    "- Peak memory (CPU): the resident-set high-water mark (`VmHWM`, reset through `/proc/self/clear_refs` after "
    "`malloc_trim`) during the warm-up call and everything it allocates (gradients, AdamW state, activations), "
    "minus the resident set before it; the model's own weights were resident before and are not included. One "
    "side at a time, in the same process, vlzoo first (so vlzoo also carries the process's one-time "
    "allocations, a few MiB, visible in the smallest runs). On CUDA: `torch.cuda.max_memory_allocated`.",
    "- MFU: FLOPs of one call / median seconds / the measured matmul peak of the same dtype and thread count. "
    "FLOPs: torch's flop counter (matmuls and convolutions), with the CPU kernels of "
    "`scaled_dot_product_attention` counted by torch's formulas for the CUDA ones (`vlzoo.budget.flop_counter_with_attention`).",
    "- CLIP: each side tokenizes the same captions with its own tokenizer (open_clip: always 77 tokens; vlzoo: "
    "the batch's longest caption), so the FLOPs differ; the control row feeds vlzoo open_clip's ids.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for results.json, results.md")
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (development)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per benchmark process")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    start, load_start = time.perf_counter(), [round(x, 2) for x in os.getloadavg()]
    results: dict[str, Any] = {name: run_benchmark(name, args.out, args) for name in BENCHMARKS}
    results.update(quick=args.quick, threads=args.threads, load_average_start=load_start,
                   load_average_end=[round(x, 2) for x in os.getloadavg()], wall_s=time.perf_counter() - start)
    add_utilisation(results)
    results.update(ratios(results))
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "results.md").write_text(markdown(results))
    print(json.dumps(results["ratios"], indent=2))
    print(f"[run_all] wrote {args.out / 'results.json'} and {args.out / 'results.md'} in {results['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
