"""Small benchmark folders in the official layouts, written by the tests, and a tiny random
transformers BLIP whose vocabulary is real words (so captions are real text to score)."""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

WORDS = ["a", "picture", "of", "man", "woman", "dog", "cat", "riding", "sitting", "on", "the", "red", "blue",
         "horse", "bike", "street", "near", "two", "people", "with", "green", "tree", "and", "in", "park"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
VOCAB = SPECIAL + WORDS + ["[DEC]", "[ENC]"]
PAD, SEP, DEC = 0, 3, VOCAB.index("[DEC]")


def photo(rng: np.random.Generator, size: tuple[int, int] = (32, 32)) -> Image.Image:
    """A smooth random RGB image (gradients and a block), ``size`` = (width, height)."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    channels = [np.sin(x / rng.uniform(3, 9) + rng.uniform(0, 6)) + np.cos(y / rng.uniform(3, 9)) for _ in range(3)]
    pixels = (np.stack(channels, -1) + 2) * 63
    x0, y0 = rng.integers(0, w // 2), rng.integers(0, h // 2)
    pixels[y0 : y0 + h // 3, x0 : x0 + w // 3] = rng.integers(0, 255, 3)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def sentence(rng: random.Random) -> str:
    """A caption with case and punctuation, as crowd-sourced ones have."""
    words = [rng.choice(WORDS) for _ in range(rng.randint(4, 10))]
    text = " ".join(words)
    if rng.random() < 0.5:
        text = text[0].upper() + text[1:]
    return text + rng.choice([".", "", " .", "!", ", ok."])


def coco_karpathy(root: Path, n_test: int = 6, seed: int = 0, captions_per_image: int = 5) -> list[dict]:
    """``dataset_coco.json`` (Karpathy's format: a train image and ``n_test`` test images,
    5 captions each) and ``val2014/COCO_val2014_<id>.jpg``; returns the test entries."""
    rng, nrng = random.Random(seed), np.random.default_rng(seed)
    (root / "val2014").mkdir(parents=True, exist_ok=True)
    images = []
    for i in range(n_test + 1):
        cocoid = 100 + i
        name = f"COCO_val2014_{cocoid:012d}.jpg"
        photo(nrng).save(root / "val2014" / name, quality=95)
        images.append({"filepath": "val2014", "filename": name, "cocoid": cocoid, "imgid": i,
                       "split": "train" if i == 0 else "test",
                       "sentences": [{"raw": sentence(rng), "tokens": []} for _ in range(captions_per_image)]})
    (root / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    return images[1:]


def vqav2(root: Path, n_images: int = 3, per_image: int = 2, seed: int = 0) -> dict:
    """VQAv2's questions and annotations files and ``val2014/`` images, plus
    ``answer_list.json``; returns the annotations by question id."""
    rng, nrng = random.Random(seed), np.random.default_rng(seed)
    (root / "val2014").mkdir(parents=True, exist_ok=True)
    questions, annotations = [], []
    answers = ["two", "red", "yes", "no", "dog", "the street", "2"]
    for i in range(n_images):
        image_id = 500 + i
        photo(nrng).save(root / "val2014" / f"COCO_val2014_{image_id:012d}.jpg", quality=95)
        for j in range(per_image):
            qid = image_id * 10 + j
            questions.append({"image_id": image_id, "question": f"what is {rng.choice(WORDS)} near?",
                              "question_id": qid})
            humans = [rng.choice(answers) for _ in range(10)]
            annotations.append({"question_id": qid, "image_id": image_id, "question_type": "what is",
                                "answer_type": rng.choice(["other", "number", "yes/no"]),
                                "multiple_choice_answer": humans[0],
                                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                                            for k, a in enumerate(humans)]})
    (root / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps({"questions": questions}))
    (root / "v2_mscoco_val2014_annotations.json").write_text(json.dumps({"annotations": annotations}))
    (root / "answer_list.json").write_text(json.dumps(answers))
    return {a["question_id"]: a for a in annotations}


def class_folders(root: Path, classes: list[str], per_class: int = 3, seed: int = 0) -> None:
    """One folder of images per class."""
    nrng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            photo(nrng).save(root / c / f"{i}.png")


def clip_benchmark_wds(root: Path, classes: list[str], per_class: int = 2, seed: int = 0,
                       templates: list[str] | None = None) -> list[int]:
    """CLIP_benchmark's webdataset layout: classnames.txt, optional templates, test/0.tar
    with ``<key>.cls`` and ``<key>.webp``; returns the labels in order."""
    nrng = np.random.default_rng(seed)
    (root / "test").mkdir(parents=True, exist_ok=True)
    (root / "classnames.txt").write_text("\n".join(classes) + "\n")
    if templates:
        (root / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")
    labels = []
    with tarfile.open(root / "test" / "0.tar", "w") as tar:
        for k in range(per_class * len(classes)):
            label = k % len(classes)
            buffer = io.BytesIO()
            photo(nrng).save(buffer, format="WEBP")
            for ext, data in (("cls", str(label).encode()), ("webp", buffer.getvalue())):
                info = tarfile.TarInfo(f"s{k:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            labels.append(label)
    return labels


def tiny_hf_blip(directory: Path, architecture: str = "BlipForConditionalGeneration", seed: int = 0):
    """A random transformers BLIP of ``architecture`` (32 px, 2 + 2 layers) saved with a BERT
    tokenizer of :data:`VOCAB` and a BlipProcessor; returns the model and processor."""
    import torch
    import transformers

    text = dict(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=64, bos_token_id=DEC, sep_token_id=SEP,
                pad_token_id=PAD, eos_token_id=SEP)
    width = 32 if architecture == "BlipForQuestionAnswering" else 48  # its answer decoder needs equal widths
    vision = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8)
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(
        transformers.BlipConfig(text_config=text, vision_config=vision, image_text_hidden_size=16)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    tokenizer = transformers.BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)}, bos_token="[DEC]")
    image_processor = transformers.BlipImageProcessor(size={"height": 32, "width": 32})
    processor = transformers.BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return model, processor


def brute_force_recall(similarity, captions, match_identical, ks=(1, 5, 10)):
    """R@k by sorting every row (stable, highest first) and walking to the first hit."""
    texts = [(i, c) for i, caps in enumerate(captions) for c in caps]

    def hit(image, t):
        owner, text = texts[t]
        return owner == image or (match_identical and text in captions[image])

    def first_hit(scores, is_hit):
        order = sorted(range(len(scores)), key=lambda j: (-scores[j], j))
        return next((r for r, j in enumerate(order) if is_hit(j) and scores[j] != float("-inf")), len(scores))

    sim = similarity.tolist()
    i2t = [first_hit(sim[i], lambda t, i=i: hit(i, t)) for i in range(len(captions))]
    t2i = [first_hit([row[t] for row in sim], lambda i, t=t: hit(i, t)) for t in range(len(texts))]
    out = {}
    for k in ks:
        out[f"r{k}_i2t"] = sum(r < k for r in i2t) / len(i2t)
        out[f"r{k}_t2i"] = sum(r < k for r in t2i) / len(t2i)
    return out
