"""CapFilt end to end on shapes sets with 20% wrong captions, with the shapes-tiny BLIP
trained here (400 steps at 32 px, about 3 minutes): the mechanism (every web and
synthetic caption scored and either kept or removed with its ITM probability, counts,
skipped images) and the filter's quality (issue 3: >= 80% of wrong captions removed,
>= 90% of right ones kept)."""

import json
from pathlib import Path

import lightning as L
import pytest

from vlzoo.capfilt import noisy_shapes_source, web_caption_rates
from vlzoo.cli import main
from vlzoo.data.datamodule import ShapesConfig, VLDataModule

IMAGES, NOISE = 200, 0.2


@pytest.fixture(scope="module")
def blip_checkpoint(tmp_path_factory):
    """The shapes-tiny BLIP (its zoo config) trained 400 steps at 32 px; its ITM head is
    the filter. The threshold 0.2 of the quality test was chosen on an equivalent run and
    the seed-0 noisy set (95% of wrong captions removed, 92.5% of right ones kept); this
    fixture's filter measured 97.5%/92.5% on seed 1 and 92.5%/95.0% on seed 2."""
    import dataclasses

    from vlzoo.hub.loaders import zoo_config_init_args

    L.seed_everything(0)
    root = tmp_path_factory.mktemp("blip")
    cls, args = zoo_config_init_args(Path(__file__).resolve().parents[2] / "zoo_configs/models/blip/shapes-tiny.yaml")
    model = args["model"]
    args["model"] = dataclasses.replace(model, vision=dataclasses.replace(model.vision, image_size=32), queue_size=1024)
    task = cls(**args)
    data = VLDataModule(shapes=ShapesConfig(image_size=32, train_size=600 * 64, val_size=64, test_size=64),
                        batch_size=64)
    trainer = L.Trainer(default_root_dir=root, max_steps=400, limit_val_batches=0, logger=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(task, datamodule=data)
    path = root / "blip.ckpt"
    trainer.save_checkpoint(path)
    return path


def noisy_source(tmp_path, seed: int = 0):
    """A JSONL of shapes test images (32 px) where 20% of captions belong to another image."""
    return noisy_shapes_source(tmp_path / "noisy", IMAGES, NOISE, image_size=32, seed=seed)


def test_capfilt_scores_every_caption_and_reports(tmp_path, blip_checkpoint, capsys):
    source, wrong = noisy_source(tmp_path)
    web = [json.loads(line)["captions"][0] for line in source.read_text().splitlines()]
    out = tmp_path / "clean"
    assert main(["capfilt", "--captioner", str(blip_checkpoint), "--filter", str(blip_checkpoint),
                 "--data", str(source), "--out", str(out), "--batch-size", "50", "--threshold", "0.3"]) == 0
    cleaned = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert len(cleaned) == IMAGES
    for i, row in enumerate(cleaned):
        removed = [e["caption"] for e in row["removed"]]
        assert len(row["captions"]) + len(removed) == 2  # one web + one synthetic caption, each decided
        assert web[i] in row["captions"] or web[i] in removed
        assert all(e["itm"] < 0.3 for e in row["removed"]) and all(e["itm"] >= 0.3 for e in row["kept"])
        assert [e["caption"] for e in row["kept"]] == row["captions"]
        assert sorted(e["source"] for e in row["kept"] + row["removed"]) == ["synthetic", "web"]
    removed_wrong, kept_right = web_caption_rates(source, wrong, out)
    print(f"capfilt at 0.3: removed {removed_wrong:.1%} of wrong captions, kept {kept_right:.1%} of right ones")
    report = json.loads((out / "capfilt_report.json").read_text())
    assert report["images"] == IMAGES and report["web_kept"] + report["web_removed"] == IMAGES
    assert report["web_kept"] == sum(e["source"] == "web" for row in cleaned for e in row["kept"])
    assert report["synthetic_kept"] + report["synthetic_removed"] == IMAGES
    assert "kept" in capsys.readouterr().out


def test_capfilt_skips_unreadable_images(tmp_path, blip_checkpoint):
    source, _ = noisy_source(tmp_path)
    rows = source.read_text().splitlines()[:6]
    first = json.loads(rows[0])
    (source.parent / first["image"]).write_bytes(b"not a png")
    source.write_text("\n".join(rows) + "\n")
    out = tmp_path / "clean"
    assert main(["capfilt", "--captioner", str(blip_checkpoint), "--filter", str(blip_checkpoint),
                 "--data", str(source), "--out", str(out)]) == 0
    report = json.loads((out / "capfilt_report.json").read_text())
    assert report["images"] == 5 and len(report["skipped"]) == 1 and first["image"] in report["skipped"][0]


@pytest.mark.parametrize("seed", [1, 2])
def test_capfilt_removes_wrong_captions_and_keeps_right_ones(tmp_path, blip_checkpoint, seed):
    """Issue 3's criterion on noisy sets the threshold was not chosen on: >= 80% of the
    wrong web captions removed, >= 90% of the right ones kept."""
    source, wrong = noisy_source(tmp_path, seed)
    out = tmp_path / "clean"
    assert main(["capfilt", "--captioner", str(blip_checkpoint), "--filter", str(blip_checkpoint),
                 "--data", str(source), "--out", str(out), "--batch-size", "100", "--threshold", "0.2"]) == 0
    removed_wrong, kept_right = web_caption_rates(source, wrong, out)
    print(f"capfilt seed {seed}: removed {removed_wrong:.1%} of wrong captions, kept {kept_right:.1%} of right ones")
    assert removed_wrong >= 0.8 and kept_right >= 0.9, (removed_wrong, kept_right)
