"""Every data source, read from files the tests write."""

import json

import pytest
from data_writers import (
    caption,
    caption_rows,
    image_bytes,
    pixel_id,
    write_images,
    write_jsonl,
    write_shards,
)
from PIL import Image

from vlzoo.data.image_text import ImageTextDataset, ImageTextStream
from vlzoo.data.sources import (
    DataSourceError,
    HFMapSource,
    HFStreamSource,
    MapSource,
    SourceOptions,
    WebDatasetSource,
    open_source,
)
from vlzoo.data.webdataset import expand_braces


def _images_of(source: MapSource) -> list[int]:
    dataset = ImageTextDataset(source, train=False, image_size=8)
    return [pixel_id(dataset[i]["image"]) for i in range(len(dataset))]


def test_jsonl_single_and_multiple_captions(tmp_path):
    names = write_images(tmp_path, 4)
    rows = caption_rows(names[:2]) + caption_rows(names[2:], captions_per_image=3)
    rows.append({"image": names[0], "caption": "another caption of the first image"})  # merged into image 0
    source = open_source(str(write_jsonl(tmp_path / "a.jsonl", rows)), "val", SourceOptions())
    assert len(source) == 4 and source.skipped == []
    assert source.records[0]["captions"] == [caption(0), "another caption of the first image"]
    assert len(source.records[3]["captions"]) == 3
    assert source.records[1]["location"].endswith("a.jsonl:2")
    assert _images_of(source) == [0, 1, 2, 3]


def test_jsonl_images_relative_to_the_file_or_image_root(tmp_path):
    names = write_images(tmp_path / "pics", 3)
    (tmp_path / "ann").mkdir()
    path = write_jsonl(tmp_path / "ann" / "b.jsonl", caption_rows(names))
    source = open_source(str(path), "train", SourceOptions(image_root=str(tmp_path / "pics")))
    assert _images_of(source) == [0, 1, 2]


@pytest.mark.parametrize("suffix, separator", [(".csv", ","), (".tsv", "\t")])
def test_csv_in_open_clip_convention(tmp_path, suffix, separator):
    names = write_images(tmp_path, 3)
    lines = [f"filepath{separator}title"] + [f"{n}{separator}{caption(i)}" for i, n in enumerate(names)]
    path = tmp_path / f"data{suffix}"
    path.write_text("\n".join(lines) + "\n")
    source = open_source(str(path), "train", SourceOptions())
    assert [r["captions"] for r in source.records] == [[caption(i)] for i in range(3)]
    assert _images_of(source) == [0, 1, 2]


def test_csv_columns_and_separator_are_configurable(tmp_path):
    names = write_images(tmp_path, 2)
    path = tmp_path / "data.csv"
    path.write_text("url;text\n" + "".join(f"{n};{caption(i)}\n" for i, n in enumerate(names)))
    options = SourceOptions(image_column="url", caption_column="text", csv_separator=";")
    assert _images_of(open_source(str(path), "train", options)) == [0, 1]
    with pytest.raises(DataSourceError, match=r"data.train: .*data.csv: no column 'filepath'"):
        open_source(str(path), "train", SourceOptions(csv_separator=";"))


def test_karpathy_split_file(tmp_path):
    write_images(tmp_path / "val2014", 4, folder=".")
    images = [{"filepath": "val2014", "filename": f"{i:05d}.png", "split": split, "imgid": i,
               "sentences": [{"raw": f"{caption(i)} a", "tokens": []}, {"raw": f"{caption(i)} b"}]}
              for i, split in enumerate(["train", "restval", "val", "test"])]
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    train = open_source(str(path), "train", SourceOptions())
    assert _images_of(train) == [0, 1]  # train includes restval
    test = open_source(str(path), "test", SourceOptions())
    assert _images_of(test) == [3] and test.records[0]["captions"] == [f"{caption(3)} a", f"{caption(3)} b"]
    assert _images_of(open_source(f"{path}:val", "train", SourceOptions())) == [2]  # FILE:SPLIT


def test_json_list_one_row_per_caption_is_grouped_by_image(tmp_path):
    names = write_images(tmp_path, 2)
    rows = [{"image": names[i % 2], "caption": f"{caption(i % 2)} {i}", "image_id": i % 2} for i in range(6)]
    path = tmp_path / "coco_karpathy_test.json"
    path.write_text(json.dumps(rows))
    source = open_source(str(path), "test", SourceOptions())
    assert len(source) == 2 and len(source.records[0]["captions"]) == 3


def test_brace_expansion():
    assert expand_braces("d/{00008..00011}.tar") == [f"d/{i:05d}.tar" for i in range(8, 12)]
    assert expand_braces("{a,b}/{1..2}.tar") == ["a/1.tar", "a/2.tar", "b/1.tar", "b/2.tar"]


def test_webdataset_shards_train_stream_and_indexed_eval(tmp_path):
    write_shards(tmp_path / "shards", count=10, per_shard=4)
    spec = str(tmp_path / "shards" / "{00000..00002}.tar")
    train = open_source(spec, "train", SourceOptions(shuffle_buffer=1))
    assert isinstance(train, WebDatasetSource) and len(train) == 10
    stream = ImageTextStream(train, image_size=8, batch_size=1)
    items = list(stream)
    assert sorted(pixel_id(it["image"]) for it in items) == list(range(10))
    assert all(it["caption"] == caption(pixel_id(it["image"])) for it in items)
    evaluation = open_source(spec, "test", SourceOptions())
    assert isinstance(evaluation, MapSource) and _images_of(evaluation) == list(range(10))
    assert open_source(str(tmp_path / "shards"), "val", SourceOptions()).records[3]["captions"] == [caption(3)]


def test_webdataset_json_member_and_shuffle_buffer_is_deterministic(tmp_path):
    import tarfile

    from data_writers import add_member

    (tmp_path / "s").mkdir()
    with tarfile.open(tmp_path / "s" / "00000.tar", "w") as tar:
        for i in range(30):
            add_member(tar, f"k{i}.jpg", image_bytes(i, fmt="JPEG"))
            add_member(tar, f"k{i}.json", json.dumps({"captions": [caption(i)], "qa": [
                {"question": "which?", "answer": str(i)}]}).encode())
    source = open_source(str(tmp_path / "s" / "00000.tar"), "train", SourceOptions(shuffle_buffer=8))
    first = [it["caption"] for it in ImageTextStream(source, image_size=8, with_qa=True, seed=3)]
    again = [it["caption"] for it in ImageTextStream(source, image_size=8, with_qa=True, seed=3)]
    assert first == again and sorted(first) == sorted(caption(i) for i in range(30))
    assert first != [caption(i) for i in range(30)]  # shuffled
    stream = ImageTextStream(source, image_size=8, seed=3)
    epoch0, epoch1 = [it["caption"] for it in stream], [it["caption"] for it in stream]
    assert epoch0 != epoch1 and sorted(epoch0) == sorted(epoch1)  # a new order each epoch


def _save_dataset(tmp_path, count: int):
    import datasets

    names = write_images(tmp_path, count)
    table = {"image": [str(tmp_path / n) for n in names], "text": [caption(i) for i in range(count)]}
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    return datasets.Dataset.from_dict(table, features=features)


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    import datasets

    dataset = _save_dataset(tmp_path, 5)
    dataset.save_to_disk(str(tmp_path / "single"))
    source = open_source(str(tmp_path / "single"), "train", SourceOptions())
    assert isinstance(source, HFMapSource) and source.image_column == "image"
    assert _images_of(source) == [0, 1, 2, 3, 4] and source.records[2]["captions"] == [caption(2)]
    datasets.DatasetDict({"train": dataset.select(range(3)), "validation": dataset.select(range(3, 5))}).save_to_disk(
        str(tmp_path / "dict"))
    assert _images_of(open_source(str(tmp_path / "dict"), "val", SourceOptions())) == [3, 4]
    assert _images_of(open_source(f"{tmp_path / 'dict'}:train", "test", SourceOptions())) == [0, 1, 2]
    with pytest.raises(DataSourceError, match="no split 'test'"):
        open_source(str(tmp_path / "dict"), "test", SourceOptions())


def test_hf_prefix_reads_a_local_dataset_and_streams_it(tmp_path):
    dataset = _save_dataset(tmp_path, 6)
    (tmp_path / "hub" / "data").mkdir(parents=True)
    dataset.select(range(4)).to_parquet(str(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet"))
    dataset.select(range(4, 6)).to_parquet(str(tmp_path / "hub" / "data" / "test-00000-of-00001.parquet"))
    name = f"hf:{tmp_path / 'hub'}"
    assert _images_of(open_source(name, "train", SourceOptions())) == [0, 1, 2, 3]
    assert _images_of(open_source(name, "test", SourceOptions())) == [4, 5]
    streamed = open_source(name, "train", SourceOptions(streaming=True, samples_per_epoch=4, shuffle_buffer=1))
    assert isinstance(streamed, HFStreamSource)
    items = list(ImageTextStream(streamed, image_size=8))
    assert sorted(pixel_id(it["image"]) for it in items) == [0, 1, 2, 3]


def test_hf_offline_error_is_clear(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataSourceError, match=r"data.train: cannot load Hugging Face dataset 'nlphuji/flickr30k'.*"
                                              r"HF_HUB_OFFLINE"):
        open_source("hf:nlphuji/flickr30k", "train", SourceOptions())


def test_unknown_source_lists_the_accepted_forms(tmp_path):
    with pytest.raises(DataSourceError, match=r"data.test: cannot read .*expected one of shapes, FILE.jsonl"):
        open_source(str(tmp_path), "test", SourceOptions())


def test_expand_makes_one_item_per_caption_and_sample_draws_one(tmp_path):
    names = write_images(tmp_path, 3)
    source = open_source(str(write_jsonl(tmp_path / "a.jsonl", caption_rows(names, 4))), "train", SourceOptions())
    expanded = ImageTextDataset(source, train=True, image_size=8, captions="expand")
    assert len(expanded) == 12
    assert sorted(expanded[i]["caption"] for i in range(12)) == sorted(c for r in source.records for c in r["captions"])
    assert [expanded[i]["index"] for i in range(12)] == [0] * 4 + [1] * 4 + [2] * 4
    sampled = ImageTextDataset(source, train=True, image_size=8, seed=5)
    assert sampled[(3, 1)]["caption"] == sampled[(3, 1)]["caption"]  # a function of seed, epoch and index
    draws = {sampled[(epoch, 1)]["caption"] for epoch in range(40)}
    assert draws == set(source.records[1]["captions"])  # every caption of the image, over the epochs


def test_byte_order_marks_and_other_field_names(tmp_path):
    names = write_images(tmp_path, 2)
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + "".join(
        json.dumps({"image_path": n, "text": caption(i)}) + "\r\n" for i, n in enumerate(names)).encode())
    source = open_source(str(jsonl), "train", SourceOptions())
    assert source.skipped == [] and _images_of(source) == [0, 1]
    csv_path = tmp_path / "bom.csv"
    csv_path.write_bytes(b"\xef\xbb\xbffilepath,title\r\n" + f'{names[1]},"a caption, with a comma"\r\n'.encode())
    assert open_source(str(csv_path), "train", SourceOptions()).records[0]["captions"] == ["a caption, with a comma"]


def test_missing_path_says_so(tmp_path):
    with pytest.raises(DataSourceError, match=r"data.val: no such file or folder '.*nowhere'"):
        open_source(str(tmp_path / "nowhere"), "val", SourceOptions())


def test_relative_paths_that_leave_the_data_folder_are_refused_by_row(tmp_path):
    """``../outside/secret.png`` is a bad row named by file and line, unless
    ``allow_outside_root``; absolute paths and paths that stay inside are read."""
    (tmp_path / "outside").mkdir()
    secret = tmp_path / "outside" / "secret.png"
    Image.new("RGB", (8, 8)).save(secret)
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(data / "images" / "a.png")
    rows = [{"image": "images/a.png", "caption": "inside"}, {"image": "../outside/secret.png", "caption": "out"},
            {"image": "images/../../outside/secret.png", "caption": "out again"},
            {"image": str(secret), "caption": "absolute"}]
    path = write_jsonl(data / "captions.jsonl", rows)
    source = open_source(str(path), "train", SourceOptions())
    assert [r["captions"] for r in source.records] == [["inside"], ["absolute"]]
    assert [loc for loc, _ in source.skipped] == [f"{path}:2", f"{path}:3"]
    assert all("leaves the data folder" in reason and "allow_outside_root" in reason for _, reason in source.skipped)
    allowed = open_source(str(path), "train", SourceOptions(allow_outside_root=True))
    assert len(allowed.records) == 4 and not allowed.skipped
    karpathy = data / "karpathy.json"
    karpathy.write_text(json.dumps({"images": [
        {"split": "test", "filepath": "images", "filename": "a.png", "sentences": [{"raw": "in"}]},
        {"split": "test", "filepath": "../outside", "filename": "secret.png", "sentences": [{"raw": "out"}]}]}))
    source = open_source(f"{karpathy}:test", "test", SourceOptions())
    assert len(source.records) == 1 and source.skipped[0][0] == f"{karpathy}:images[1]"
