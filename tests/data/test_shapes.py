import json
import re

import numpy as np
import pytest
from PIL import Image

from vlzoo.data import shapes


def test_same_seed_same_bytes():
    a = shapes.build_split("test", 40, seed=3)
    b = shapes.build_split("test", 40, seed=3)
    assert a.images.tobytes() == b.images.tobytes()
    assert a.records == b.records


def test_other_seed_or_split_differs():
    a = shapes.build_split("test", 20, seed=0)
    assert a.images.tobytes() != shapes.build_split("test", 20, seed=1).images.tobytes()
    assert a.images.tobytes() != shapes.build_split("val", 20, seed=0).images.tobytes()


def test_samples_do_not_depend_on_split_size():
    small, large = shapes.build_split("train", 10), shapes.build_split("train", 30)
    assert small.images.tobytes() == large.images[:10].tobytes()


def test_cache_round_trip_is_identical():
    fresh = shapes.build_split("val", 25, seed=2)
    first = shapes.load_split("val", 25, seed=2)  # generates and caches
    cached = shapes.load_split("val", 25, seed=2)  # reads the cache
    assert np.array_equal(first.images, fresh.images)
    assert np.array_equal(np.asarray(cached.images), fresh.images)
    assert cached.records == fresh.records


def test_image_size_is_configurable():
    split = shapes.build_split("test", 3, image_size=96)
    assert split.images.shape == (3, 96, 96, 3) and split.images.dtype == np.uint8


def test_records_have_captions_negatives_and_qa():
    split = shapes.build_split("train", 300)
    counts = {len(r["objects"]) for r in split.records}
    assert counts == {1, 2, 3}
    for r in split.records:
        assert len(set(r["captions"])) >= 3
        assert r["negatives"], r
        for neg in r["negatives"]:
            assert neg["caption"] not in r["captions"]
        questions = {q["type"] for q in r["qa"]}
        assert {"count", "exists", "size"} <= questions
        if len(r["objects"]) > 1:
            assert {n["kind"] for n in r["negatives"]} & {"swap_colour", "reverse_relation", "swap_size", "swap_shape"}


def test_relations_match_geometry():
    rng = np.random.default_rng(0)
    for _ in range(200):
        scene = shapes.sample_scene(rng)
        objs = scene.objects
        for a, b in zip(objs, objs[1:]):
            along = (b.x - a.x) if scene.axis == "horizontal" else (b.y - a.y)
            across = (b.y - a.y) if scene.axis == "horizontal" else (b.x - a.x)
            assert along > 0 and abs(across) <= 0.5 * along


def test_colour_swap_negative_binds_words_wrongly():
    a = shapes.ShapeObject("circle", "red", "large", 0.2, 0.5)
    b = shapes.ShapeObject("square", "blue", "small", 0.8, 0.5)
    scene = shapes.Scene((a, b), "horizontal")
    negatives = {n["kind"]: n["caption"] for n in shapes.negatives_for(scene, np.random.default_rng(0))}
    assert shapes.captions_for(scene)[0] == "a large red circle to the left of a small blue square"
    assert negatives["swap_colour"] == "a large blue circle to the left of a small red square"
    assert negatives["reverse_relation"] == "a small blue square to the left of a large red circle"
    assert negatives["swap_size"] == "a small red circle to the left of a large blue square"
    qa = {q["question"]: q["answer"] for q in shapes.qa_for(scene, np.random.default_rng(0))}
    assert qa["what colour is the circle?"] == "red"
    assert qa["how many shapes are there?"] == "two"


def test_rendered_colours_are_where_the_objects_are():
    obj = shapes.ShapeObject("square", "red", "large", 0.5, 0.5)
    image = shapes.render_scene(shapes.Scene((obj,)), np.random.default_rng(0), 64)
    centre = image[28:36, 28:36].reshape(-1, 3).mean(0)
    corner = image[:6, :6].reshape(-1, 3).mean(0)
    assert centre[0] > 150 and centre[1] < 110 and centre[2] < 110
    assert corner.max() < 110


def test_export_writes_pngs_and_jsonl(tmp_path):
    split = shapes.load_split("test", 12)
    jsonl = shapes.export_split(split, tmp_path, limit=5)
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert len(rows) == 5
    for i, row in enumerate(rows):
        assert set(row) == {"image", "captions", "negatives", "qa"}
        pixels = np.asarray(Image.open(tmp_path / row["image"]))
        assert np.array_equal(pixels, split.images[i])


def test_bad_split_name_is_a_clear_error():
    with pytest.raises(ValueError, match="shapes split must be one of"):
        shapes.build_split("training", 3)


def test_parallel_generation_equals_serial():
    serial = shapes.build_split("train", 2100, image_size=16, processes=1)
    parallel = shapes.build_split("train", 2100, image_size=16, processes=2)
    assert serial.images.tobytes() == parallel.images.tobytes()
    assert serial.records == parallel.records


def test_every_generated_word_is_in_the_frozen_vocabulary():
    from vlzoo.data.tokenizers import SHAPES_VOCAB, ShapesTokenizer

    tokenizer = ShapesTokenizer()
    unknown = tokenizer._tok.token_to_id("[UNK]")
    texts = shapes.caption_corpus(seed=3, size=500)
    assert not [t for t, ids in zip(texts, tokenizer.encode_batch(texts)) if unknown in ids]
    assert len(set(SHAPES_VOCAB)) == len(SHAPES_VOCAB) == tokenizer.info.vocab_size
    assert tokenizer._tok.token_to_id("orange") == SHAPES_VOCAB.index("orange")  # ids never move


def test_no_article_before_a_vowel():
    texts = shapes.caption_corpus(seed=1, size=500)
    bad = [t for t in texts if re.search(r"\ba [aeiou]", t)]
    assert not bad, bad[:5]
    questions = [q["question"] for i in range(200) for q in shapes.generate_sample(0, "train", i, 16)[1]["qa"]]
    assert any("that is orange?" in q for q in questions)


def test_generating_a_large_split_reports_progress(capsys):
    shapes.build_split("val", 2500, image_size=8, processes=1)
    err = capsys.readouterr().err
    assert "vlzoo: generating shapes val split (8 px): 2500/2500 (100%)" in err


def test_a_datamodule_generates_only_the_splits_its_stage_reads(tmp_path, monkeypatch):
    """vlzoo validate / test never wait for the training split (prepare_data by stage)."""
    import types

    from vlzoo.data.datamodule import ShapesConfig, VLDataModule

    monkeypatch.setenv("VLZOO_HOME", str(tmp_path / "home"))
    sizes = ShapesConfig(image_size=8, train_size=6, val_size=4, test_size=5)
    for stage, generated in (("validate", {"val"}), ("test", {"val", "test"}), ("fit", {"val", "test", "train"})):
        data = VLDataModule(shapes=sizes)
        data.trainer = types.SimpleNamespace(state=types.SimpleNamespace(fn=types.SimpleNamespace(value=stage)))
        data.prepare_data()
        cached = {p.name.split("-")[0] for p in (tmp_path / "home" / "datasets" / "shapes").iterdir()}
        assert cached == generated, stage
