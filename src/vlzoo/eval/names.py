"""The standard benchmarks' names and the metric keys of their reports (light: the manifest
checks its figures against them without importing torch)."""

from __future__ import annotations

RETRIEVAL_KEYS = tuple(f"{p}r{k}_{d}" for p in ("", "itc_") for d in ("i2t", "t2i") for k in (1, 5, 10)) + (
    "txt_r_mean", "img_r_mean", "r_mean", "rsum")
CAPTION_KEYS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
ZEROSHOT_KEYS = ("top1", "top5", "mean_per_class_recall")
NOCAPS_DOMAINS = ("in-domain", "near-domain", "out-domain")

BENCHMARK_KEYS: dict[str, tuple[str, ...]] = {
    "coco-retrieval": RETRIEVAL_KEYS,
    "flickr30k-retrieval": RETRIEVAL_KEYS,
    "coco-caption": CAPTION_KEYS,
    "nocaps": CAPTION_KEYS + tuple(f"{d}/{m}" for d in NOCAPS_DOMAINS for m in CAPTION_KEYS),
    "vqav2": ("overall",),
    "imagenet-zeroshot": ZEROSHOT_KEYS,
    "zeroshot": ZEROSHOT_KEYS,
}
