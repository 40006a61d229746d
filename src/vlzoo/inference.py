"""The inference commands: ``vlzoo caption``, ``vqa``, ``retrieve``, ``zeroshot``, ``embed``.

Each loads ``--model`` with :func:`vlzoo.load` (manifest name, checkpoint, run or
export directory, Hugging Face or open_clip directory), on the GPU when there is one,
reads images in batches (an unreadable image is skipped, named and counted), and prints
readable lines, or JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlzoo.cli_help import examples

if TYPE_CHECKING:
    import torch

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def load_model(ref: str, device: str | None):
    """``vlzoo.load(ref)`` on ``device`` (default: CUDA when available)."""
    import torch

    from vlzoo.zoo import load

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return load(ref, device=device)


def image_files(paths: list[str]) -> list[Path]:
    """Image files named, or found (sorted, recursively) in the directories named."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        else:
            found.append(p)
    if not found:
        raise FileNotFoundError(f"no image files in {', '.join(paths)} (looked for {sorted(IMAGE_SUFFIXES)})")
    return found


def image_batches(paths: list[Path], batch_size: int, skipped: list[str]) -> Iterator[tuple[list[Path], list]]:
    """(paths, PIL images) batches of the readable images; unreadable ones go to ``skipped``."""
    from vlzoo.data.images import BadSample, open_image

    batch: list[tuple[Path, Any]] = []
    for path in paths:
        try:
            batch.append((path, open_image(path)))
        except BadSample as bad:
            skipped.append(f"{path}: {bad.reason}")
            print(f"vlzoo: skipped {path}: {bad.reason}", file=sys.stderr)
        if len(batch) == batch_size:
            yield [p for p, _ in batch], [im for _, im in batch]
            batch = []
    if batch:
        yield [p for p, _ in batch], [im for _, im in batch]


def progress(items: Iterator, total: int, label: str, quiet: bool) -> Iterator:
    """A progress bar on stderr for long runs (none for one batch or ``quiet``)."""
    if quiet or total <= 1:
        yield from items
        return
    from rich.console import Console
    from rich.progress import track

    yield from track(items, total=total, description=label, console=Console(stderr=True))


def emit(args: argparse.Namespace, results: Any, lines: list[str], skipped: list[str]) -> None:
    """Print ``results`` as JSON (``--json``) or ``lines``; say what was skipped."""
    if args.json:
        print(json.dumps({"results": results, "skipped": skipped}, indent=2))
        return
    print("\n".join(lines))
    if skipped:
        print(f"skipped {len(skipped)} unreadable image(s)", file=sys.stderr)


def _batches(args, paths):
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    skipped: list[str] = []
    total = -(-len(paths) // args.batch_size)
    return skipped, progress(image_batches(paths, args.batch_size, skipped), total, args.command, args.json)


# ------------------------------------------------------------------ commands
def caption(args: argparse.Namespace) -> None:
    model = load_model(args.model, args.device)
    model._require("generate", "caption images")
    settings = {k: v for k, v in (("method", args.method), ("max_length", args.max_length),
                                  ("num_beams", args.num_beams)) if v is not None}
    skipped, batches = _batches(args, image_files(args.images))
    results = []
    for paths, images in batches:
        for path, text in zip(paths, model.generate(images, args.prompt, **settings), strict=True):
            results.append({"image": str(path), "caption": text})
    if not results:
        raise ValueError(f"none of the images could be read ({len(skipped)} skipped)")
    emit(args, results, [f"{r['image']}: {r['caption']}" for r in results], skipped)


def vqa(args: argparse.Namespace) -> None:
    if Path(args.question).is_file() or Path(args.question).suffix.lower() in IMAGE_SUFFIXES:
        raise ValueError(f"the last argument must be the question, got the file name {args.question!r} "
                         '(vlzoo vqa IMAGE... "QUESTION")')
    model = load_model(args.model, args.device)
    model._require("vqa", "answer questions")
    skipped, batches = _batches(args, image_files(args.images))
    results = []
    for paths, images in batches:
        for path, text in zip(paths, model.vqa(images, [args.question] * len(images)), strict=True):
            results.append({"image": str(path), "question": args.question, "answer": text})
    if not results:
        raise ValueError(f"none of the images could be read ({len(skipped)} skipped)")
    emit(args, results, [f"{r['image']}: {r['answer']}" for r in results], skipped)


def embed_images(model, args, paths: list[Path]) -> tuple[list[Path], torch.Tensor, list[str]]:
    import torch

    """(readable paths, (N, D) embeddings, skipped)."""
    model._require("encode", "embed images")
    skipped, batches = _batches(args, paths)
    kept, embeds = [], []
    for batch_paths, images in batches:
        kept += batch_paths
        embeds.append(model.encode_image(images).float().cpu())
    if not embeds:
        raise ValueError(f"none of the {len(paths)} images could be read")
    return kept, torch.cat(embeds), skipped


def retrieve(args: argparse.Namespace) -> None:
    model = load_model(args.model, args.device)
    paths, image_embeds, skipped = embed_images(model, args, image_files(args.images))
    text = model.encode_text([args.query]).float().cpu()  # (1, D)
    from vlzoo.zoo import embedding_similarity

    scores = embedding_similarity(image_embeds, text)[:, 0]
    top = scores.topk(min(args.top, len(paths)))
    results = [{"rank": r + 1, "image": str(paths[i]), "score": round(float(s), 4)}
               for r, (s, i) in enumerate(zip(top.values.tolist(), top.indices.tolist(), strict=True))]
    emit(args, results, [f"{r['rank']}. {r['image']}  {r['score']:.4f}" for r in results], skipped)


def zeroshot(args: argparse.Namespace) -> None:
    from vlzoo.eval.retrieval import mean_over_prompts
    from vlzoo.zoo import embedding_similarity

    labels = [x.strip() for x in args.labels.split(",") if x.strip()]
    if len(labels) < 2:
        raise ValueError(f"--labels needs at least two comma-separated class names, got {args.labels!r}")
    model = load_model(args.model, args.device)
    paths, image_embeds, skipped = embed_images(model, args, image_files(args.images))
    templates = args.template or ["a photo of a {}"]
    bad = [t for t in templates if t.count("{}") != 1 or t.replace("{}", "").count("{")]
    if bad:
        raise ValueError(f"--template must contain exactly one {{}} (where the label goes), got {bad}")
    text = model.encode_text([t.format(c) for c in labels for t in templates]).float().cpu()
    classes = mean_over_prompts(text, len(labels))
    probs = (100.0 * embedding_similarity(image_embeds, classes)).softmax(-1)
    results = []
    for path, row in zip(paths, probs.tolist(), strict=True):
        ranked = sorted(zip(labels, row, strict=True), key=lambda x: -x[1])
        results.append({"image": str(path), "label": ranked[0][0],
                        "probabilities": {c: round(p, 4) for c, p in ranked}})
    lines = [f"{r['image']}: {r['label']} ({r['probabilities'][r['label']]:.1%})" for r in results]
    emit(args, results, lines, skipped)


def embed(args: argparse.Namespace) -> None:
    from safetensors.torch import save_file

    model = load_model(args.model, args.device)
    paths, image_embeds, skipped = embed_images(model, args, image_files(args.images))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    try:
        save_file({"image_embeds": image_embeds.contiguous()}, str(tmp),
                  metadata={"images": json.dumps([str(p) for p in paths]), "model": args.model})
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    result = {"out": str(out), "images": len(paths), "shape": list(image_embeds.shape)}
    emit(args, result, [f"wrote {out}: image_embeds {tuple(image_embeds.shape)} for {len(paths)} images "
                        "(names in the file's metadata 'images')"], skipped)


# ------------------------------------------------------------------ parsers
def _common(parser: argparse.ArgumentParser, batch_size: int = 32) -> None:
    parser.add_argument("--model", required=True, help="manifest name, checkpoint, run or export directory")
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def add_inference_commands(commands) -> None:
    """``caption``, ``vqa``, ``retrieve``, ``zeroshot`` and ``embed`` subcommands."""
    p = commands.add_parser("caption", help="caption images (BLIP, BLIP-2)",
                            epilog=examples("vlzoo caption shapes_test/images/000000.png "
                                   "--model runs/blip-shapes-tiny/checkpoints/last.ckpt"))
    p.add_argument("images", nargs="+", help="image files or directories")
    p.add_argument("--prompt", default=None, help="text the caption continues (default: the model's)")
    p.add_argument("--method", choices=["greedy", "beam", "nucleus"], default=None)
    p.add_argument("--num-beams", type=int, default=None)
    p.add_argument("--max-length", type=int, default=None)
    _common(p)
    p.set_defaults(run=caption)
    p = commands.add_parser("vqa", help="answer a question about images (BLIP VQA, BLIP-2 with an LLM)",
                            epilog=examples('vlzoo vqa shapes_test/images/000000.png "how many shapes are there?" '
                                   "--model runs/finetune-vqa-blip/checkpoints/last.ckpt"))
    p.add_argument("images", nargs="+", help="image files or directories, then the question")
    p.add_argument("question", help="the question")
    _common(p)
    p.set_defaults(run=vqa)
    p = commands.add_parser("retrieve", help="rank images by similarity to a text query",
                            epilog=examples('vlzoo retrieve --images shapes_test/images --query "a red circle" '
                                   "--top 5 --model runs/clip-shapes-tiny/checkpoints/last.ckpt"))
    p.add_argument("--images", nargs="+", required=True, help="image files or directories")
    p.add_argument("--query", required=True)
    p.add_argument("--top", type=int, default=5)
    _common(p)
    p.set_defaults(run=retrieve)
    p = commands.add_parser("zeroshot", help="classify images among labels by text prompts",
                            epilog=examples("vlzoo zeroshot shapes_test/images/000000.png --labels "
                                   '"red circle,blue square,green triangle" '
                                   "--model runs/clip-shapes-tiny/checkpoints/last.ckpt"))
    p.add_argument("images", nargs="+", help="image files or directories")
    p.add_argument("--labels", required=True, help="comma-separated class names")
    p.add_argument("--template", action="append", default=None,
                   help='prompt template with {} (repeatable; default "a photo of a {}")')
    _common(p)
    p.set_defaults(run=zeroshot)
    p = commands.add_parser("embed", help="embed images into a safetensors file",
                            epilog=examples("vlzoo embed --images shapes_test/images --out shapes_test.safetensors "
                                   "--model runs/clip-shapes-tiny/checkpoints/last.ckpt"))
    p.add_argument("--images", nargs="+", required=True, help="image files or directories")
    p.add_argument("--out", required=True, help="output .safetensors (image_embeds; metadata: images)")
    _common(p, batch_size=64)
    p.set_defaults(run=embed)
