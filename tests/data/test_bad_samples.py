"""Dirty data never kills a run: bad samples are skipped, counted exactly and logged
once; mostly-bad data stops with a clear error; ``raise`` names the sample."""

import io
import json
import logging
import tarfile

import numpy as np
import pytest
from data_writers import add_member, caption, image_bytes, write_images, write_shards
from PIL import Image

from vlzoo.cli import main
from vlzoo.data.datamodule import VLDataModule
from vlzoo.data.image_text import (
    BadSampleError,
    ImageTextDataset,
    ImageTextStream,
    TooManyBadSamples,
)
from vlzoo.data.sources import SourceOptions, open_source

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


def _png(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def write_dirty_jsonl(root, good: int) -> tuple[str, int, int]:
    """``good`` clean rows, odd-but-valid images (grayscale, palette, RGBA, CMYK,
    16-bit, over-long caption), and one or two rows of every bad kind. Returns the path,
    the number of bad images (found while loading) and of bad rows (found while reading)."""
    names = write_images(root, good)
    lines = [json.dumps({"image": n, "caption": caption(i)}) for i, n in enumerate(names)]
    odd = {
        "gray.png": _png(Image.new("L", (20, 14), 100)),
        "palette.png": _png(Image.new("P", (20, 14), 3)),
        "rgba.png": _png(Image.new("RGBA", (20, 14), (255, 0, 0, 100))),
        "cmyk.jpg": _png(Image.new("CMYK", (20, 14), (0, 255, 0, 0)), "JPEG"),
        "deep.png": _png(Image.fromarray(np.full((14, 20), 40000, dtype=np.uint16))),
    }
    for name, data in odd.items():
        (root / name).write_bytes(data)
        lines.append(json.dumps({"image": name, "caption": f"an odd image {name}"}))
    lines.append(json.dumps({"image": names[0], "caption": "word " * 500}))  # truncated by the tokenizer
    bad_images = {
        "missing-1.png": None, "missing-2.png": None,
        "zero-1.png": b"", "zero-2.png": b"",
        "cut-1.jpg": image_bytes(1, (60, 60), "JPEG")[:200], "cut-2.png": image_bytes(2, (60, 60))[:80],
        "junk.png": b"\x00\x01 definitely not an image",
        "bomb.png": _png(Image.new("L", (1200, 1200))),  # over data.max_image_pixels below
    }
    for name, data in bad_images.items():
        if data is not None:
            (root / name).write_bytes(data)
        lines.append(json.dumps({"image": name, "caption": f"a bad image {name}"}))
    lines += [json.dumps({"image": names[1], "caption": ""}), json.dumps({"image": names[2], "caption": "  \t "})]
    path = root / "dirty.jsonl"
    body = "\n".join(lines).encode() + b'\n{"image": "' + names[3].encode() + b'", "caption": "caf\xe9 latin-1"}\n'
    path.write_bytes(body)
    return str(path), len(bad_images), 3


def test_fit_over_dirty_jsonl_completes_and_counts_exactly(tmp_path, caplog):
    data, bad_images, bad_rows = write_dirty_jsonl(tmp_path / "data", good=194)
    records = 194 + 5 + 1 + bad_images  # rows that parse; the bad rows are refused while reading
    assert records % 16 == 0  # batches of 16 cover the epoch: every bad sample is met
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="vlzoo.data"):
        main(["fit", "--config", str(ROOT / "zoo_configs/models/clip/shapes-tiny.yaml"),
              "--trainer.default_root_dir", str(run), "--trainer.max_epochs", "1", "--trainer.max_steps", "-1",
              "--trainer.val_check_interval", "1.0", "--trainer.check_val_every_n_epoch", "1",
              "--trainer.enable_progress_bar", "false",
              "--data.train", data, "--data.val", data, "--data.test", data, "--data.batch_size", "16",
              "--data.max_image_pixels", "1000000"])
    metrics = json.loads((run / "metrics.json").read_text())
    expected = bad_images + bad_rows
    assert metrics["train/skipped_samples"] == expected
    assert metrics["val/skipped_samples"] == expected
    assert metrics["test/skipped_samples"] == expected
    assert np.isfinite(metrics["test/r1_t2i"])
    train_logs = [r.getMessage() for r in caplog.records if "(train)" in r.getMessage()]
    assert len(train_logs) == expected  # each bad sample logged once, with location and reason
    assert any("missing-1.png" in m and "missing image file" in m for m in train_logs)
    assert any("dirty.jsonl:" in m and "not valid UTF-8" in m for m in train_logs)
    assert any("dirty.jsonl:" in m and "image too large: 1200x1200" in m for m in train_logs)


def test_mostly_bad_data_stops_with_a_clear_error(tmp_path):
    names = write_images(tmp_path, 20)
    rows = [{"image": n, "caption": caption(i)} for i, n in enumerate(names)]
    rows += [{"image": f"gone-{i}.png", "caption": "x"} for i in range(80)]
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dataset = ImageTextDataset(open_source(str(path), "train", SourceOptions()), train=True, image_size=8)
    with pytest.raises(TooManyBadSamples, match=r"bad.jsonl: \d+ of \d+ samples read so far are bad"):
        for i in range(20, 100):
            dataset[i]
    path.write_text("".join(json.dumps({"image": n, "caption": " " if i % 4 else "ok"}) + "\n"
                            for i, n in enumerate(names)))
    with pytest.raises(TooManyBadSamples, match=r"data.train: 15 of 20 rows .* are bad \(first: .*:2: empty caption"):
        VLDataModule(train=str(path)).source("train")


def test_raise_policy_names_the_sample(tmp_path):
    names = write_images(tmp_path, 3)
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps({"image": n, "caption": "c"}) + "\n" for n in names)
                    + json.dumps({"image": "gone.png", "caption": "c"}) + "\n")
    source = open_source(str(path), "train", SourceOptions())
    dataset = ImageTextDataset(source, train=True, image_size=8, policy=VLDataModule(on_bad_sample="raise").policy)
    with pytest.raises(BadSampleError, match=r"a.jsonl:4: missing image file .*on_bad_sample=raise"):
        dataset[3]
    path.write_text(path.read_text() + '{"image": "x.png", "caption": ""}\n')
    with pytest.raises(BadSampleError, match=r"a.jsonl:5: empty caption"):
        VLDataModule(train=str(path), on_bad_sample="raise").source("train")
    with pytest.raises(ValueError, match="data.on_bad_sample must be one of"):
        VLDataModule(on_bad_sample="ignore")


def test_eval_drops_bad_images_and_keeps_the_rest(tmp_path):
    names = write_images(tmp_path, 4)
    (tmp_path / "junk.png").write_bytes(b"junk")
    rows = [{"image": n, "caption": caption(i)} for i, n in enumerate(names[:2])]
    rows += [{"image": "junk.png", "caption": "junk"}] + [{"image": names[3], "caption": caption(3)}]
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dataset = ImageTextDataset(open_source(str(path), "test", SourceOptions()), train=False, image_size=8)
    items = [dataset[i] for i in range(4)]
    assert [it.get("bad", False) for it in items] == [False, False, True, False]
    assert items[2]["skipped"][0][1] == "not a decodable image"


def test_webdataset_bad_members_and_corrupt_shard_tail_are_skipped(tmp_path):
    write_shards(tmp_path / "s", count=8, per_shard=8)
    with tarfile.open(tmp_path / "s" / "00001.tar", "w") as tar:
        add_member(tar, "a.png", image_bytes(100))  # no caption
        add_member(tar, "b.txt", b"no image here")
        add_member(tar, "c.png", b"not a png")
        add_member(tar, "c.txt", b"bad image")
        add_member(tar, "d.png", image_bytes(101))
        add_member(tar, "d.txt", b"\xff\xfe not utf-8")
        for i in range(110, 114):
            add_member(tar, f"{i}.png", image_bytes(i))
            add_member(tar, f"{i}.txt", caption(i).encode())
    data = (tmp_path / "s" / "00001.tar").read_bytes()
    (tmp_path / "s" / "00001.tar").write_bytes(data[: 12 * 1024 + 600])  # cut inside the last image
    spec = str(tmp_path / "s" / "{00000..00001}.tar")
    source = open_source(spec, "train", SourceOptions(shuffle_buffer=1, samples_per_epoch=14))
    items = list(ImageTextStream(source, image_size=8))  # 11 good samples a pass: the second pass tops up
    reasons = {r for it in items for _, r in it["skipped"]}
    assert len(items) == 14
    assert sorted({it["caption"] for it in items}) == sorted(caption(i) for i in [*range(8), 110, 111, 112])
    assert {"no image member (has txt)", "not a decodable image", "caption is not valid UTF-8"} <= reasons
    assert any(r.startswith("no caption") for r in reasons)
    assert any(r.startswith("corrupt shard") for r in reasons)


def test_too_small_for_one_batch_is_an_error(tmp_path):
    from vlzoo.data.tokenizers import build_tokenizer

    names = write_images(tmp_path, 5)
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps({"image": n, "caption": "c"}) + "\n" for n in names))
    dm = VLDataModule(train=str(path), batch_size=8)
    dm.attach(build_tokenizer("shapes", 16), 8, [0.5] * 3, [0.5] * 3)
    with pytest.raises(ValueError, match=r"data.train: 5 usable samples .* no whole batch of data.batch_size=8"):
        dm.train_dataloader()


def test_an_eval_split_with_no_readable_image_is_a_clear_error(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps({"image": f"gone-{i}.png", "caption": "c"}) + "\n" for i in range(6)))
    with pytest.raises(TooManyBadSamples, match="data.val: no image of the val split could be read"):
        main(["validate", "--config", str(ROOT / "zoo_configs/models/clip/shapes-tiny.yaml"),
              "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.enable_progress_bar", "false",
              "--data.val", str(path)])
