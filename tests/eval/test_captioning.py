"""coco-caption's scores through pycocoevalcap: vlzoo's reading of the standard files and
its scorer calls against COCOEvalCap itself (pycocotools loading, the library's own loop)."""

from __future__ import annotations

import json
import random
import shutil

import pytest

from vlzoo.eval import captioning
from vlzoo.eval.captioning import caption_metrics, coco_caption_scores, python_tokenize

pytest.importorskip("pycocoevalcap")
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="coco-caption's tokenizer and METEOR need Java")

WORDS = "a man woman dog cat riding sitting on the red blue horse bike street, near. Two people's don't It's! 3.5 x-ray".split()


def caption(rng: random.Random) -> str:
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 14)))
    return text[0].upper() + text[1:] + rng.choice([".", "", "!", " .", "?"])


def coco_files(tmp_path, n_images: int = 240, seed: int = 0):
    """COCO caption annotations (5 references per image, string and int ids mixed in order)
    and results, with case, punctuation, contractions and numbers."""
    rng = random.Random(seed)
    images = [{"id": i * 7 + 1, "file_name": f"{i}.jpg"} for i in range(n_images)]
    anns = [{"id": k, "image_id": im["id"], "caption": caption(rng)}
            for k, (im, _) in enumerate((im, j) for im in images for j in range(5))]
    results = [{"image_id": im["id"], "caption": caption(rng)} for im in images]
    results[3]["caption"] = "A man\nriding a horse."  # a line break inside a caption
    (tmp_path / "ann.json").write_text(json.dumps({"images": images, "annotations": anns, "info": {},
                                                   "licenses": [], "type": "captions"}))
    (tmp_path / "res.json").write_text(json.dumps(results))
    return tmp_path / "res.json", tmp_path / "ann.json"


def reference_scores(results_path, annotations_path) -> dict[str, float]:
    """COCOEvalCap.evaluate() as the library runs it (SPICE stubbed: its models are a download)."""
    import pycocoevalcap.eval as coco_eval
    from pycocotools.coco import COCO

    class NoSpice:
        def compute_score(self, gts, res):
            return 0.0, []

        def method(self):
            return "SPICE"

    original = coco_eval.Spice
    coco_eval.Spice = NoSpice
    try:
        coco = COCO(str(annotations_path))
        results = coco.loadRes(str(results_path))
        evaluator = coco_eval.COCOEvalCap(coco, results)
        evaluator.params["image_id"] = results.getImgIds()
        evaluator.evaluate()
    finally:
        coco_eval.Spice = original
    return {k: v for k, v in evaluator.eval.items() if k != "SPICE"}


@needs_java
def test_scores_equal_coco_eval_cap_on_a_few_hundred_captions(tmp_path, capfd):
    from vlzoo.evaluate import score_caption_files

    results_path, annotations_path = coco_files(tmp_path)
    ours = score_caption_files(str(results_path), str(annotations_path))
    theirs = reference_scores(results_path, annotations_path)
    assert set(theirs) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}
    for key, value in theirs.items():
        assert ours["metrics"][key] == pytest.approx(value, abs=2e-4 if key == "METEOR" else 1e-6), key
    assert ours["images"] == 240 and ours["annotated_images"] == 240
    if captioning.spice_missing():
        assert any(n.startswith("SPICE skipped: ") for n in ours["notes"]) and "SPICE" not in ours["metrics"]


@needs_java
def test_training_metrics_are_coco_captions_bleu4_and_cider():
    refs = [["A red circle is left of a blue square.", "a red circle next to a square"],
            ["Two small green triangles side by side", "a pair of green triangles"],
            ["a big yellow star above the line", "One yellow star over a line."]]
    preds = ["a red circle left of a blue square", "two green triangles", "a yellow star"]
    metrics = caption_metrics(preds, refs)
    full = coco_caption_scores(dict(enumerate(preds)), dict(enumerate(refs)), ("Bleu_4", "CIDEr")).scores
    assert metrics == {"bleu4": full["Bleu_4"], "cider": full["CIDEr"]}
    perfect = caption_metrics([r[0] for r in refs], refs)
    assert perfect["bleu4"] == pytest.approx(1.0) and perfect["cider"] > metrics["cider"]


@needs_java
def test_empty_and_multiline_captions_keep_their_place():
    scores = coco_caption_scores({1: "", 2: "a dog\non a bike", 3: "   "},
                                 {1: ["a cat"], 2: ["a dog on a bike"], 3: ["a red bike"]}, ("Bleu_1",))
    assert scores.images == 3 and 0.0 < scores.scores["Bleu_1"] < 1.0


def test_without_java_the_python_tokenizer_approximates_ptb(monkeypatch, capsys):
    monkeypatch.setattr(captioning, "java_available", lambda: False)
    assert python_tokenize("A man's dog, don't RUN... fast!") == "a man 's dog do n't run fast"
    scores = coco_caption_scores({1: "A dog."}, {1: ["a dog"]}, ("Bleu_1", "METEOR", "CIDEr"))
    assert scores.scores["Bleu_1"] == pytest.approx(1.0) and "METEOR" not in scores.scores
    assert any("METEOR skipped" in n for n in scores.notes)
    assert "approximation of the PTB tokenizer" in scores.notes[0]  # said in every report, not only once


def test_mismatched_keys_and_unknown_metrics_are_errors():
    with pytest.raises(ValueError, match="1 references without a prediction"):
        coco_caption_scores({1: "a"}, {1: ["a"], 2: ["b"]})
    with pytest.raises(ValueError, match="unknown caption metrics"):
        coco_caption_scores({1: "a"}, {1: ["a"]}, ("BLEU",))
    with pytest.raises(ValueError, match="image 1 has no reference captions"):
        coco_caption_scores({1: "a"}, {1: []})


@needs_java
def test_nocaps_domains_are_scored_as_their_own_corpora(tmp_path):
    from vlzoo.evaluate import score_caption_files

    rng = random.Random(1)
    domains = ["in-domain", "near-domain", "out-domain"]
    images = [{"id": i, "file_name": f"{i:04x}.jpg", "domain": domains[i % 3]} for i in range(12)]
    anns = [{"id": k, "image_id": i, "caption": caption(rng)} for k, i in enumerate(j // 10 for j in range(120))]
    results = [{"image_id": i, "caption": caption(rng)} for i in range(12)]
    (tmp_path / "ann.json").write_text(json.dumps({"images": images, "annotations": anns}))
    (tmp_path / "res.json").write_text(json.dumps(results))
    report = score_caption_files(str(tmp_path / "res.json"), str(tmp_path / "ann.json"))
    refs = {i: [a["caption"] for a in anns if a["image_id"] == i] for i in range(12)}
    for domain in domains:
        keys = [im["id"] for im in images if im["domain"] == domain]
        alone = coco_caption_scores({k: results[k]["caption"] for k in keys}, {k: refs[k] for k in keys}, ("CIDEr",))
        assert report["metrics"][f"{domain}/CIDEr"] == pytest.approx(alone.scores["CIDEr"], abs=1e-9)
    assert report["images"] == 12


def test_caption_files_with_unknown_or_duplicate_ids_or_missing_fields_are_named(tmp_path):
    from vlzoo.eval.formats import FormatError
    from vlzoo.evaluate import score_caption_files

    (tmp_path / "ann.json").write_text(json.dumps({"images": [{"id": "a"}], "annotations": [
        {"image_id": "a", "id": 1, "caption": "a dog"}]}))

    def fails(results, match):
        (tmp_path / "res.json").write_text(json.dumps(results))
        with pytest.raises(FormatError, match=match):
            score_caption_files(str(tmp_path / "res.json"), str(tmp_path / "ann.json"))

    fails([{"image_id": "b", "caption": "x"}], r"res.json: 1 image_id\(s\) not in .*ann.json: 'b'")
    fails([{"image_id": "a", "caption": "x"}, {"image_id": "a", "caption": "y"}], "image_id 'a' appears more than once")
    fails([{"image_id": "a"}], "entry 0 has no 'caption' field")
    fails([{"image_id": "a", "caption": 3}], "entry 0: 'caption' is 3; expected a str")
    fails({"image_id": "a", "caption": "x"}, "expected a JSON list")
