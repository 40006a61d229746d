"""``vlzoo eval`` end to end: a tiny random transformers BLIP (real-word vocabulary) on
fixtures in the official layouts that these tests write; its figures against the same
figures computed from transformers' own outputs."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from eval.benchmark_fixtures import (
    DEC,
    VOCAB,
    brute_force_recall,
    class_folders,
    clip_benchmark_wds,
    coco_karpathy,
    tiny_hf_blip,
    vqav2,
)
from PIL import Image

from vlzoo.cli import main
from vlzoo.eval.benchmarks import BenchmarkDataError
from vlzoo.eval.captioning import coco_caption_scores, java_available
from vlzoo.eval.vqa import official_accuracy
from vlzoo.evaluate import Options, evaluate_model

transformers = pytest.importorskip("transformers")
needs_java = pytest.mark.skipif(not java_available(), reason="coco-caption needs Java")
ENC = VOCAB.index("[ENC]")


def run_json(capfd, argv: list[str]) -> dict:
    capfd.readouterr()
    assert main([*argv, "--json"]) == 0
    out = capfd.readouterr().out
    return json.loads(out)  # only JSON on stdout, even with the Java scorers' output


def blip_pre_caption(text: str, max_words: int = 30) -> str:
    """BLIP's caption cleaning before its tokenizer (its retrieval datasets' pre_caption)."""
    import re

    text = re.sub(r"\s{2,}", " ", re.sub(r"""([.!"()*#:;~])""", " ", text.lower())).rstrip("\n").strip(" ")
    return " ".join(text.split(" ")[:max_words])


def pil_images(root, entries):
    return [Image.open(root / e["filepath"] / e["filename"]).convert("RGB") for e in entries]


@needs_java
@torch.no_grad()
def test_coco_caption_equals_scoring_transformers_own_captions(tmp_path, capfd):
    entries = coco_karpathy(tmp_path / "coco")
    model, processor = tiny_hf_blip(tmp_path / "blip")
    report = run_json(capfd, ["eval", "--model", str(tmp_path / "blip"), "--benchmark", "coco-caption", "--data",
                              str(tmp_path / "coco"), "--batch-size", "4", "--save-results", str(tmp_path / "res.json")])
    # the reference: transformers' generate with BLIP's paper settings, the prompt stripped as BLIP does
    inputs = processor(images=pil_images(tmp_path / "coco", entries), text=["a picture of "] * len(entries),
                       return_tensors="pt")
    ids = model.generate(pixel_values=inputs.pixel_values, input_ids=inputs.input_ids, num_beams=3, max_length=20,
                         min_length=5)
    theirs = [t[len("a picture of"):].strip() for t in processor.batch_decode(ids, skip_special_tokens=True)]
    ours = {r["image_id"]: r["caption"] for r in json.loads((tmp_path / "res.json").read_text())}
    assert [ours[e["cocoid"]] for e in entries] == theirs
    references = {e["cocoid"]: [s["raw"] for s in e["sentences"]] for e in entries}
    expected = coco_caption_scores({e["cocoid"]: c for e, c in zip(entries, theirs)}, references).scores
    assert report["metrics"] == pytest.approx(expected, abs=1e-9)
    assert report["counts"] == {"images": 6} and report["skipped"] == []
    assert report["settings"]["max_length"] == 16 and report["settings"]["min_length"] == 1  # 20 / 5 minus 4 prompt
    assert report["published"] is None and report["units"].startswith("fractions")


def test_retrieval_itc_and_itm_rerank_equal_transformers(tmp_path, capfd, monkeypatch):
    from vlzoo.evaluate import ZooEvalModel

    entries = coco_karpathy(tmp_path / "coco", n_test=5)
    model, processor = tiny_hf_blip(tmp_path / "blip", "BlipForImageTextRetrieval")
    k = 3
    itm_logits, graphs = ZooEvalModel.itm_logits, []

    def spy(self, *args):  # the ITM passes (7.7 M pairs on COCO) must build no autograd graph
        out = itm_logits(self, *args)
        graphs.append(torch.is_grad_enabled() or out.requires_grad)
        return out

    monkeypatch.setattr(ZooEvalModel, "itm_logits", spy)
    report = run_json(capfd, ["eval", "--model", str(tmp_path / "blip"), "--benchmark", "coco-retrieval", "--data",
                              str(tmp_path / "coco"), "--rerank-k", str(k), "--batch-size", "2"])
    assert graphs and not any(graphs)
    torch.set_grad_enabled(False)  # the reference below
    captions = [[blip_pre_caption(s["raw"]) for s in e["sentences"]] for e in entries]
    texts = [c for caps in captions for c in caps]
    pixels = processor(images=pil_images(tmp_path / "coco", entries), return_tensors="pt").pixel_values
    tokens = processor.tokenizer(texts, padding=True, return_tensors="pt")
    vision = model.vision_model(pixel_values=pixels).last_hidden_state
    image_feat = F.normalize(model.vision_proj(vision[:, 0]), dim=-1)
    text_out = model.text_encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
    similarity = image_feat @ F.normalize(model.text_proj(text_out[:, 0]), dim=-1).T  # (N, T)

    def itm(i: int, t: int) -> float:  # BLIP's ITM: [ENC] first, the match logit
        ids = tokens.input_ids[t : t + 1].clone()
        ids[:, 0] = ENC
        out = model.text_encoder(input_ids=ids, attention_mask=tokens.attention_mask[t : t + 1],
                                 encoder_hidden_states=vision[i : i + 1]).last_hidden_state
        return model.itm_head(out[:, 0])[0, 1].item()

    i2t = torch.full_like(similarity, float("-inf"))
    t2i = torch.full_like(similarity, float("-inf"))
    for i in range(len(entries)):
        for t in similarity[i].topk(k).indices.tolist():
            i2t[i, t] = itm(i, t) + similarity[i, t]
    for t in range(len(texts)):
        for i in similarity[:, t].topk(k).indices.tolist():
            t2i[i, t] = itm(i, t) + similarity[i, t]
    itc = brute_force_recall(similarity, captions, match_identical=False)
    reranked = {**{m: v for m, v in brute_force_recall(i2t, captions, False).items() if m.endswith("i2t")},
                **{m: v for m, v in brute_force_recall(t2i, captions, False).items() if m.endswith("t2i")}}
    metrics = report["metrics"]
    for key, value in itc.items():
        assert metrics[f"itc_{key}"] == pytest.approx(100 * value), key
    for key, value in reranked.items():
        assert metrics[key] == pytest.approx(100 * value), key
    assert metrics["rsum"] == pytest.approx(100 * sum(reranked.values()))
    assert report["settings"]["rerank_k"] == k and report["settings"]["itm_score"] == "match_logit"
    assert report["settings"]["caption_text"] == "blip_caption, 30 words"
    assert report["counts"] == {"images": 5, "texts": 25}
    torch.set_grad_enabled(True)


@torch.no_grad()
def test_vqav2_by_ranking_and_by_generation(tmp_path):
    annotations = vqav2(tmp_path / "vqa")
    tiny_hf_blip(tmp_path / "blip", "BlipForQuestionAnswering")
    options = Options(batch_size=4, quiet=True, save_results=str(tmp_path / "res.json"))
    for mode in ("rank", "generate"):
        options.vqa_inference = mode
        report = evaluate_model(str(tmp_path / "blip"), "vqav2", str(tmp_path / "vqa"), "cpu", options)
        answers = {r["question_id"]: r["answer"] for r in json.loads((tmp_path / "res.json").read_text())}
        assert set(answers) == set(annotations) and report["settings"]["inference"] == mode
        if mode == "rank":
            answer_list = json.loads((tmp_path / "vqa" / "answer_list.json").read_text())
            assert set(answers.values()) <= set(answer_list)
        accuracy = [official_accuracy(answers[q], [a["answer"] for a in annotations[q]["answers"]])
                    for q in annotations]
        assert report["metrics"]["overall"] == pytest.approx(round(100 * sum(accuracy) / len(accuracy), 2))
        assert report["counts"] == {"questions": 6, "annotated_questions": 6}
        assert report["settings"]["question_text"] == "blip_question, 50 words"
    # BLIP counts [DEC] in max_length 10 / min_length 1: 9 new tokens at most, none at least
    from vlzoo.eval.protocol import BLIP_VQA

    assert (BLIP_VQA.vqa.generation_config().max_length, BLIP_VQA.vqa.generation_config().min_length) == (9, 0)


@torch.no_grad()
def test_rank_answers_equals_scoring_every_answer(tmp_path):
    from vlzoo.zoo import load

    tiny_hf_blip(tmp_path / "blip", "BlipForQuestionAnswering")
    zoo = load(tmp_path / "blip")
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    q_ids, q_mask = zoo.tokenize(["what is near?", "the dog", "a red bike in the park"])
    answers = ["two", "red", "yes", "no", "dog", "the street", "a man riding a horse"]
    a_ids, a_mask = zoo.tokenize(answers)
    model = zoo.model
    tokens = model.vision(pixels).tokens
    picked = model.rank_answers(tokens, q_ids, q_mask, a_ids, a_mask, k=len(answers))
    # every answer's summed smoothed cross-entropy (BLIP's decoder loss), the lowest wins
    a_ids = a_ids.clone()
    a_ids[:, 0] = DEC
    nll = torch.empty(3, len(answers))
    for b in range(3):
        for a in range(len(answers)):
            logits = model.answer_logits(pixels[b : b + 1], q_ids[b : b + 1], q_mask[b : b + 1], a_ids[a : a + 1],
                                         a_mask[a : a + 1])
            n = int(a_mask[a].sum())
            nll[b, a] = F.cross_entropy(logits[0, : n - 1], a_ids[a, 1:n], label_smoothing=0.1, reduction="sum")
    assert picked.tolist() == nll.argmin(1).tolist()
    top1 = model.rank_answers(tokens, q_ids, q_mask, a_ids, a_mask, k=1)  # the likeliest first token only
    first = model.decode(a_ids[:1, :1].expand(3, 1), torch.ones(3, 1, dtype=torch.long),
                         model.question_states(tokens, q_ids, q_mask), q_mask)[:, 0]
    assert top1.tolist() == first[:, a_ids[:, 1]].argmax(1).tolist()


@pytest.fixture(scope="module")
def clip_checkpoint(tmp_path_factory):
    from tiny_configs import save_task_checkpoint, tiny_task

    return str(save_task_checkpoint(tiny_task("clip"), tmp_path_factory.mktemp("clip") / "clip.ckpt"))


@torch.no_grad()
def test_zeroshot_on_a_webdataset_and_an_image_folder(tmp_path, clip_checkpoint):
    from vlzoo.zoo import load

    classes = ["red circle", "blue square", "green triangle"]
    labels = clip_benchmark_wds(tmp_path / "wds", classes, templates=["a {c}.", "a photo of the {c}"])
    report = evaluate_model(clip_checkpoint, "zeroshot", str(tmp_path / "wds"), "cpu", Options(quiet=True))
    assert report["counts"] == {"images": 6, "classes": 3} and report["settings"]["n_templates"] == 2
    assert report["metrics"]["top5"] is None  # 3 classes: top-5 says nothing
    zoo = load(clip_checkpoint)
    import io
    import tarfile

    with tarfile.open(tmp_path / "wds" / "test" / "0.tar") as tar:
        images = [Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB") for m in tar if m.name.endswith("webp")]
    classifier = F.normalize(torch.stack([
        zoo.encode_text([f"a {c}.", f"a photo of the {c}"]).mean(0) for c in classes]), dim=-1)
    predictions = (zoo.encode_image(images) @ classifier.T).argmax(1).tolist()
    assert report["metrics"]["top1"] == pytest.approx(100 * sum(p == y for p, y in zip(predictions, labels)) / 6)
    class_folders(tmp_path / "folder", ["cat", "dog"], per_class=2)
    (tmp_path / "folder" / "dog" / "broken.png").write_bytes(b"not an image")
    report = evaluate_model(clip_checkpoint, "zeroshot", str(tmp_path / "folder"), "cpu", Options(quiet=True))
    assert report["counts"] == {"images": 4, "classes": 2} and len(report["skipped"]) == 1  # skipped, named
    assert "broken.png" in report["skipped"][0] and report["settings"]["n_templates"] == 80


def test_bad_benchmark_data_is_named(tmp_path, clip_checkpoint):
    entries = coco_karpathy(tmp_path / "coco", n_test=2)
    (tmp_path / "coco" / entries[0]["filepath"] / entries[0]["filename"]).unlink()
    with pytest.raises(BenchmarkDataError, match=r"dataset_coco.json: 1 of its 2 images are not on disk, e.g. .*COCO_val2014"):
        evaluate_model(clip_checkpoint, "coco-retrieval", str(tmp_path / "coco"), "cpu")
    with pytest.raises(BenchmarkDataError, match="no Karpathy split file found"):
        evaluate_model(clip_checkpoint, "flickr30k-retrieval", str(tmp_path / "coco"), "cpu")
    with pytest.raises(ValueError, match="--benchmark 'coco': expected one of coco-retrieval"):
        evaluate_model(clip_checkpoint, "coco", str(tmp_path / "coco"), "cpu")
    (tmp_path / "imagenet").mkdir()
    class_folders(tmp_path / "imagenet", ["n01440764", "n01443537"], per_class=1)
    with pytest.raises(BenchmarkDataError, match="expected ImageNet val's 1000 synset folders"):
        evaluate_model(clip_checkpoint, "imagenet-zeroshot", str(tmp_path / "imagenet"), "cpu")


def test_json_before_or_after_the_scorer(tmp_path, capfd):
    (tmp_path / "ann.json").write_text(json.dumps({"annotations": [{"image_id": 1, "caption": "a red dog"}]}))
    (tmp_path / "res.json").write_text(json.dumps([{"image_id": 1, "caption": "a red dog"}]))
    files = ["--results", str(tmp_path / "res.json"), "--annotations", str(tmp_path / "ann.json")]
    for argv in (["eval", "--json", "caption", *files], ["eval", "caption", *files, "--json"]):
        capfd.readouterr()
        assert main(argv) == 0
        report = json.loads(capfd.readouterr().out)
        assert report["images"] == 1 and report["units"].startswith("fractions")
    capfd.readouterr()
    assert main(["eval", "caption", *files]) == 0
    assert "Bleu_1   1.0000" in capfd.readouterr().out  # fractions with four decimals


def test_eval_command_errors_and_help(capsys):
    with pytest.raises(ValueError, match="--model, --benchmark, --data required"):
        main(["eval"])
    with pytest.raises(SystemExit):
        main(["eval", "caption", "--help"])
    assert "example:" in capsys.readouterr().out


def test_download_fetches_the_official_layout_and_refuses_unsafe_zips(tmp_path, monkeypatch, clip_checkpoint):
    import zipfile

    from vlzoo import evaluate

    source = tmp_path / "source"
    entries = coco_karpathy(source, n_test=2)
    karpathy = [{"image": f"{e['filepath']}/{e['filename']}", "caption": [s["raw"] for s in e["sentences"]]}
                for e in entries]
    (source / "coco_karpathy_test.json").write_text(json.dumps(karpathy))
    with zipfile.ZipFile(source / "val2014.zip", "w") as zf:
        for e in entries:
            zf.write(source / "val2014" / e["filename"], f"val2014/{e['filename']}")
    files = [evaluate.DataFile((source / "coco_karpathy_test.json").as_uri()),
             evaluate.DataFile((source / "val2014.zip").as_uri(), extract=True)]
    monkeypatch.setitem(evaluate.DOWNLOADS, "coco-retrieval", (files, None))
    data = tmp_path / "data"
    lines = evaluate.download_benchmark("coco-retrieval", data, progress=False)
    assert "2 files unpacked" in lines[1] and not (data / "val2014.zip").exists()
    report = evaluate_model(clip_checkpoint, "coco-retrieval", str(data), "cpu", Options(quiet=True))
    assert report["counts"] == {"images": 2, "texts": 10}
    assert "already unpacked" in evaluate.download_benchmark("coco-retrieval", data, progress=False)[1]

    with zipfile.ZipFile(source / "evil.zip", "w") as zf:
        zf.writestr("../outside.txt", "x")
    monkeypatch.setitem(evaluate.DOWNLOADS, "vqav2", ([evaluate.DataFile((source / "evil.zip").as_uri(), True)], None))
    with pytest.raises(ValueError, match="would be written outside"):
        evaluate.download_benchmark("vqav2", tmp_path / "vqa", progress=False)
    assert not (tmp_path / "outside.txt").exists()
    assert "ImageNet is not public" in evaluate.download_benchmark("imagenet-zeroshot", tmp_path / "in")[-1]


def test_every_benchmark_has_metric_keys_a_reader_and_download_notes():
    from vlzoo.eval.benchmarks import BENCHMARKS
    from vlzoo.eval.names import BENCHMARK_KEYS
    from vlzoo.evaluate import DOWNLOADS
    from vlzoo.hub.manifest import load_manifest

    assert set(BENCHMARKS) == set(BENCHMARK_KEYS) == set(DOWNLOADS)
    published = {e.metric["benchmark"] for e in load_manifest().values() if "benchmark" in e.metric}
    assert {"imagenet-zeroshot", "coco-retrieval", "coco-caption", "vqav2"} <= published
