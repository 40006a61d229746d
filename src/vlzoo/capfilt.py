"""CapFilt (BLIP): caption a noisy image-text set and keep only the pairs that match.

A captioner (a BLIP checkpoint) writes synthetic captions by nucleus sampling; a filter
(a BLIP checkpoint) scores every web and synthetic caption with its ITM head; captions
whose match probability is below ``threshold`` are removed.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlzoo.data import shapes
from vlzoo.data.datamodule import preprocess_images
from vlzoo.data.images import BadSample, decode
from vlzoo.data.sources import MapSource, SourceOptions, open_source
from vlzoo.models.generation import GenerationConfig
from vlzoo.utils import atomic_write_json


@dataclass
class CapFiltReport:
    """Counts of a CapFilt run; ``skipped`` lists images that could not be read."""

    images: int = 0
    web_kept: int = 0
    web_removed: int = 0
    synthetic_kept: int = 0
    synthetic_removed: int = 0
    skipped: list[str] = field(default_factory=list)


def _pixels(task, images: list[torch.Tensor]) -> torch.Tensor:
    """uint8 (3, H, W) images of any sizes -> (B, 3, S, S) preprocessed for ``task``."""
    pre = task.preprocess_config
    mean, std = torch.tensor(pre.mean).view(1, 3, 1, 1), torch.tensor(pre.std).view(1, 3, 1, 1)
    return torch.cat([preprocess_images(img[None], pre.image_size, mean, std) for img in images]).to(task.device)


@torch.no_grad()
def match_probability(task, pixel_values: torch.Tensor, rows: list[int], texts: list[str]) -> torch.Tensor:
    """(P,) ITM match probability of image ``rows[p]`` with ``texts[p]``: the sigmoid of
    the task's batched match-minus-no-match logit (the one retrieval reranks with)."""
    if not texts:
        return torch.empty(0)
    image_tokens, _ = task.model.image_tokens_and_feat(pixel_values)
    rows = torch.tensor(rows, device=image_tokens.device)
    return torch.sigmoid(task.score_pairs({"tokens": image_tokens}, rows, texts)).cpu()


def capfilt_batch(captioner, filt, records: list[dict[str, Any]], images: list[torch.Tensor], threshold: float,
                  synthetic: int, generation: GenerationConfig) -> list[dict[str, Any]]:
    """Caption and filter one batch of records with their decoded images; returns the cleaned records."""
    generated = []
    pixels_c = _pixels(captioner, images)
    for _ in range(synthetic):
        generated.append(captioner.caption(pixels_c, config=generation))
    rows, texts, kinds = [], [], []
    for i, record in enumerate(records):
        for caption in record["captions"]:
            rows.append(i), texts.append(caption), kinds.append("web")
        for j in range(synthetic):
            rows.append(i), texts.append(generated[j][i]), kinds.append("synthetic")
    same_input = captioner.preprocess_config == filt.preprocess_config
    scores = match_probability(filt, pixels_c if same_input else _pixels(filt, images), rows, texts)
    cleaned = [{"image": _image_name(r), "captions": [], "kept": [], "removed": []} for r in records]
    for row, text, kind, score in zip(rows, texts, kinds, scores.tolist(), strict=True):
        entry = {"caption": text, "source": kind, "itm": round(score, 4)}
        if score >= threshold:
            cleaned[row]["captions"].append(text)
            cleaned[row]["kept"].append(entry)
        else:
            cleaned[row]["removed"].append(entry)
    return cleaned


def run_capfilt(captioner, filt, source: str | Path, out: str | Path, threshold: float = 0.5, synthetic: int = 1,
                batch_size: int = 64, generation: GenerationConfig | None = None) -> CapFiltReport:
    """Write ``OUT/captions.jsonl`` (image; ``captions``: the kept texts; ``kept`` and
    ``removed``: caption, source web|synthetic, ITM probability) and
    ``OUT/capfilt_report.json``. Unreadable images are skipped and counted."""
    from rich.progress import track

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    generation = generation or GenerationConfig(method="nucleus", top_p=0.9, max_length=30, min_length=1)
    data = open_source(str(source), "test", SourceOptions())  # any source; shards are indexed
    records = data.records
    report = CapFiltReport(skipped=[f"{location}: {reason}" for location, reason in data.skipped])
    tmp = out / "captions.jsonl.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for start in track(range(0, len(records), batch_size), description="capfilt"):
            batch, images = _decode(data, records[start : start + batch_size], report)
            if not batch:
                continue
            for cleaned in capfilt_batch(captioner, filt, batch, images, threshold, synthetic, generation):
                _count(report, cleaned)
                f.write(json.dumps(cleaned) + "\n")
    tmp.replace(out / "captions.jsonl")
    atomic_write_json(out / "capfilt_report.json", report.__dict__)
    return report


def _image_name(record: dict[str, Any]) -> str:
    """The image path of a file-based record, else the record's location."""
    return str(record["image"]) if isinstance(record["image"], (str, Path)) else record["location"]


def _decode(source: MapSource, records: list[dict[str, Any]],
            report: CapFiltReport) -> tuple[list[dict[str, Any]], list[torch.Tensor]]:
    """The records whose image decodes, and those images (each file read once)."""
    keep, images = [], []
    for r in records:
        try:
            images.append(decode(source.read_image(r)))
            keep.append(r)
        except BadSample as bad:  # missing, truncated, undecodable: skip and count
            report.skipped.append(f"{r['location']} ({_image_name(r)}): {bad.reason}")
    return keep, images


def _count(report: CapFiltReport, cleaned: dict[str, Any]) -> None:
    report.images += 1
    for entry in cleaned["kept"]:
        if entry["source"] == "web":
            report.web_kept += 1
        else:
            report.synthetic_kept += 1
    for entry in cleaned["removed"]:
        if entry["source"] == "web":
            report.web_removed += 1
        else:
            report.synthetic_removed += 1


def noisy_shapes_source(out: str | Path, images: int, noise: float = 0.2, image_size: int = 64,
                        seed: int = 0) -> tuple[Path, set[int]]:
    """A CapFilt test set: ``images`` shapes test images exported to ``OUT/captions.jsonl``
    with one caption each, a ``noise`` fraction of them (seeded) replaced by a caption
    of another scene. Returns the JSONL path and the indices of the wrong rows."""
    source = shapes.export_split(shapes.load_split("test", images, image_size, seed), out, images)
    rows = [json.loads(line) for line in source.read_text().splitlines()]
    rng = random.Random(seed)
    wrong = set(rng.sample(range(len(rows)), int(noise * len(rows))))
    for i, row in enumerate(rows):
        caption = row["captions"][0]
        if i in wrong:
            other = rng.choice([r for r in rows if not set(r["captions"]) & set(row["captions"])])
            caption = other["captions"][0]
        row["captions"] = [caption]
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return source, wrong


def web_caption_rates(source: str | Path, wrong: set[int], out: str | Path) -> tuple[float, float]:
    """(fraction of wrong web captions removed, fraction of right ones kept) of a CapFilt
    run on ``source`` (a :func:`noisy_shapes_source` JSONL, ``wrong`` its wrong rows)
    that wrote ``OUT/captions.jsonl``. Rows are matched by image file name (skipped
    images drop out)."""
    rows = [json.loads(line) for line in Path(source).read_text().splitlines()]
    lines = (Path(out) / "captions.jsonl").read_text().splitlines()
    cleaned = {Path(r["image"]).name: r["captions"] for r in map(json.loads, lines)}
    kept = {i: row["captions"][0] in cleaned[name] for i, row in enumerate(rows)
            if (name := Path(row["image"]).name) in cleaned}
    wrong_seen = [i for i in kept if i in wrong]
    right_seen = [i for i in kept if i not in wrong]
    if not wrong_seen or not right_seen:
        raise ValueError(f"{out}: the CapFilt output lacks wrong or right rows of {source}")
    return (sum(not kept[i] for i in wrong_seen) / len(wrong_seen), sum(kept[i] for i in right_seen) / len(right_seen))
