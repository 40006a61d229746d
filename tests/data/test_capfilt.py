"""CapFilt end to end on a shapes set with 20% wrong captions, with a briefly trained BLIP.

The filter here is trained for a few steps only (test time), so these tests check the
mechanism — every web and synthetic caption scored and either kept or removed with
its ITM probability, counts, skipped images — not the filter's quality."""

import json

import lightning as L
import pytest

from vlzoo.cli import main
from vlzoo.config import BLIPConfig, EvalConfig, OptimConfig, TextConfig, VisionConfig
from vlzoo.data.capfilt import noisy_shapes_source, web_caption_rates
from vlzoo.data.datamodule import ShapesConfig, VLDataModule
from vlzoo.models.generation import GenerationConfig
from vlzoo.tasks import BLIPTask

IMAGES, NOISE = 200, 0.2


@pytest.fixture(scope="module")
def blip_checkpoint(tmp_path_factory):
    """A small BLIP trained briefly on shapes (32 px); its ITM head is the filter."""
    L.seed_everything(0)
    root = tmp_path_factory.mktemp("blip")
    cfg = BLIPConfig(
        embed_dim=64, queue_size=1024, momentum=0.99, min_temperature=0.01, alpha_ramp_steps=50,
        vision=VisionConfig(impl="timm", name="vit_tiny_patch16_224", image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3,
                            kwargs=dict(patch_size=8, embed_dim=64, depth=2, num_heads=2)),
        text=TextConfig(impl="bert", tokenizer="shapes", context_length=40,
                        kwargs=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
                                    max_position_embeddings=48, initializer_range=0.1, hidden_dropout_prob=0.0,
                                    attention_probs_dropout_prob=0.0)),
    )
    task = BLIPTask(cfg, OptimConfig(lr=2e-3, warmup_steps=30, weight_decay=0.05), EvalConfig(rerank_k=4),
                    GenerationConfig(method="greedy", max_length=20, min_length=1))
    data = VLDataModule(shapes=ShapesConfig(image_size=32, train_size=1280, val_size=64, test_size=64), batch_size=64)
    trainer = L.Trainer(default_root_dir=root, max_steps=20, limit_val_batches=0, logger=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(task, datamodule=data)
    path = root / "blip.ckpt"
    trainer.save_checkpoint(path)
    return path


def noisy_source(tmp_path):
    """A JSONL of shapes test images (32 px) where 20% of captions belong to another image."""
    return noisy_shapes_source(tmp_path / "noisy", IMAGES, NOISE, image_size=32)


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
    removed_wrong, kept_right = web_caption_rates(source, wrong, out)  # not asserted: a 20-step filter
    print(f"capfilt: removed {removed_wrong:.1%} of wrong captions, kept {kept_right:.1%} of right ones")
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
