"""Two-stage retrieval evaluation time: N images x 5N captions, ITM reranking the top k.

A BLIP at the shapes-tiny sizes (``zoo_configs/models/blip/shapes-tiny.yaml``, random
weights: the time does not depend on them) evaluates N random 64 px images against the
five captions of each (random shapes scenes) as ``TwoStageEvaluator.evaluate`` does:
ITC similarity of every image with every distinct caption, then ITM scores of each
image's top k captions and each caption's top k images (BLIP's caption metrics are not
part of it). Times the image pass (tokens and ITC embeddings) and the evaluation.

    python benchmarks/bench_retrieval.py --json /tmp/retrieval.json [--quick]
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import arguments, device, write_json

from vlzoo.config import BLIPConfig, EvalConfig, OptimConfig, load_yaml_section
from vlzoo.data.datamodule import EvalAnnotations
from vlzoo.data.shapes import captions_for, sample_scene
from vlzoo.eval.evaluator import TwoStageEvaluator
from vlzoo.tasks.momentum import BLIPTask

CONFIG = Path(__file__).resolve().parent.parent / "zoo_configs/models/blip/shapes-tiny.yaml"
K = 128
IMAGE_BATCH = 64


def build_task(k: int) -> BLIPTask:
    cfg = load_yaml_section(CONFIG, "model.init_args.model", BLIPConfig)
    torch.manual_seed(0)
    return BLIPTask(cfg, OptimConfig(), EvalConfig(rerank_k=k)).to(device()).eval()


def annotations(n: int, seed: int = 0) -> EvalAnnotations:
    """Five captions for each of ``n`` random scenes; no hard negatives or zero-shot labels."""
    rng = np.random.default_rng(seed)
    return EvalAnnotations(captions=[captions_for(sample_scene(rng)) for _ in range(n)])


@torch.no_grad()
def image_outputs(task: BLIPTask, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    """ITM tokens and ITC embeddings of every image, in batches."""
    parts = [task.image_tokens_and_embeds(pixels[i : i + IMAGE_BATCH]) for i in range(0, len(pixels), IMAGE_BATCH)]
    return {"tokens": torch.cat([t for t, _ in parts]), "embeds": torch.cat([e for _, e in parts])}


def evaluate_once(task: BLIPTask, n: int) -> dict[str, float]:
    """Seconds of the image pass and of the two-stage evaluation of ``n`` images."""
    ann = annotations(n)
    pixels = torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(1)).to(task.device)
    start = time.perf_counter()
    images = image_outputs(task, pixels)
    middle = time.perf_counter()
    TwoStageEvaluator(task, task.eval_config).evaluate(images, ann)  # ITC + ITM rerank, no captions
    end = time.perf_counter()
    return {"image_pass_s": middle - start, "evaluate_s": end - middle, "total_s": end - start}


def itm_pairs(n: int, k: int) -> int:
    """Pairs ITM scores: each image's top k distinct captions, each caption's top k images."""
    texts = len({c for caps in annotations(n).captions for c in caps})
    return n * min(k, texts) + texts * min(k, n)


def run(n: int, k: int, repeats: int) -> dict[str, Any]:
    task = build_task(k)
    evaluate_once(task, 8)  # warm-up
    runs = [evaluate_once(task, n) for _ in range(repeats)]
    median = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    pairs = itm_pairs(n, k)
    return {"images": n, "captions": 5 * n, "k": k, "itm_pairs": pairs, "repeats": repeats, "runs": runs,
            **median, "itm_pairs_per_s": pairs / median["evaluate_s"]}


def main() -> None:
    args = arguments(__doc__.split("\n\n")[0])
    n, repeats = (16, 1) if args.quick else (64, 1)
    result = run(n, K, args.repeats or repeats)
    print(f"{n} images x {5 * n} captions, k={K}: image pass {result['image_pass_s']:.2f} s, "
          f"evaluation {result['evaluate_s']:.2f} s ({result['itm_pairs']} ITM pairs)", flush=True)
    write_json(args.json, {"benchmark": "retrieval", **result})


if __name__ == "__main__":
    main()
