"""BLIP-2 stage 1: training speed with and without the frozen-feature cache.

The frozen image encoder's output depends only on the image when there is no random
augmentation, so ``model.cache_image_features`` computes it once per training image.
This times ``BLIP2Task`` training steps on shapes in both modes, in the same process
and on the same data: the second epoch onward is what the cache speeds up, so both
runs first do one epoch (not timed), then ``--steps`` timed steps (median of
``--repeats`` windows). Prints samples/s of both and the ratio (``--json OUT``: also
writes them there, for ``run_all.py``).

    python benchmarks/blip2_feature_cache.py                              # shapes-tiny sizes
    python benchmarks/blip2_feature_cache.py --vision vit_small_patch16_224 --image-size 224
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

from vlzoo.config import BLIP2Config, EvalConfig, OptimConfig, TextConfig, VisionConfig
from vlzoo.data.datamodule import ShapesConfig, VLDataModule
from vlzoo.tasks import BLIP2Task


class StepTimer(L.Callback):
    """Wall time of each training step after ``skip`` steps."""

    def __init__(self, skip: int):
        self.skip, self.times, self._start = skip, [], 0.0

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step > self.skip:
            self.times.append(time.perf_counter() - self._start)


def config(args, cached: bool) -> BLIP2Config:
    kwargs = {} if args.vision != "vit_tiny_patch16_224" else dict(patch_size=8, embed_dim=96, depth=3, num_heads=3)
    return BLIP2Config(
        embed_dim=128, num_queries=8, cache_image_features=cached,
        vision=VisionConfig(impl="timm", name=args.vision, image_size=args.image_size, output_layer=-1, kwargs=kwargs),
        qformer=TextConfig(impl="bert", tokenizer="shapes", context_length=40, pooling="mean",
                           kwargs=dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                                       intermediate_size=512, max_position_embeddings=64)),
    )


def samples_per_second(args, cached: bool) -> list[float]:
    L.seed_everything(0)
    data = VLDataModule(shapes=ShapesConfig(image_size=64, train_size=args.train_size, val_size=8, test_size=8),
                        batch_size=args.batch_size)
    epoch = args.train_size // args.batch_size
    timer = StepTimer(skip=epoch)
    with tempfile.TemporaryDirectory() as root:
        trainer = L.Trainer(max_steps=epoch + args.steps * args.repeats, limit_val_batches=0, logger=False,
                            default_root_dir=root, enable_progress_bar=False, enable_model_summary=False,
                            callbacks=[timer])
        trainer.fit(BLIP2Task(config(args, cached), OptimConfig(lr=1e-4), EvalConfig()), datamodule=data)
    windows = [timer.times[i * args.steps : (i + 1) * args.steps] for i in range(args.repeats)]
    return [args.batch_size * len(w) / sum(w) for w in windows if w]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vision", default="vit_tiny_patch16_224", help="timm name of the frozen encoder "
                        "(the default is shaped like the shapes CLIP tower)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--train-size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, frozen encoder {args.vision} "
          f"at {args.image_size} px, batch {args.batch_size}")
    windows = {cached: samples_per_second(args, cached) for cached in (False, True)}
    results = {cached: statistics.median(rates) for cached, rates in windows.items()}
    print(f"without cache: {results[False]:.1f} samples/s")
    print(f"with cache:    {results[True]:.1f} samples/s")
    print(f"speed-up: {results[True] / results[False]:.2f}x")
    if args.json:
        figures = {"benchmark": "blip2_feature_cache", "vision": args.vision, "image_size": args.image_size,
                   "batch": args.batch_size, "train_size": args.train_size, "steps": args.steps,
                   "repeats": args.repeats, "uncached_per_s": results[False], "cached_per_s": results[True],
                   "speedup": results[True] / results[False], "uncached_windows": windows[False],
                   "cached_windows": windows[True]}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
