"""vlzoo.load / create_model / list_models and the ZooModel methods, on tiny checkpoints."""

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_configs import save_task_checkpoint, tiny_task

import vlzoo
from vlzoo.zoo import CapabilityError

TEXTS = ["a red circle", "a large blue square to the left of a small star"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    torch.manual_seed(0)
    tasks = {family: tiny_task(family) for family in ("clip", "albef", "blip", "blip2")}
    return {f: (t.eval(), save_task_checkpoint(t, root / f"{f}.ckpt")) for f, t in tasks.items()}


@pytest.mark.parametrize("family", ["clip", "albef", "blip", "blip2"])
def test_load_a_fit_checkpoint_encodes_like_its_task(checkpoints, family):
    task, path = checkpoints[family]
    model = vlzoo.load(path)
    assert model.family == family and not model.training
    images = torch.randn(2, 3, 16, 16)
    batch = task.tokenizer(TEXTS)
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), task.model.encode_image(images))
        assert torch.equal(model.encode_text(TEXTS), task.model.encode_text(batch["input_ids"], batch["attention_mask"]))
        assert torch.equal(model.encode_text(batch["input_ids"], batch["attention_mask"]), model.encode_text(TEXTS))
    sim = model.similarity(images, TEXTS)
    assert sim.shape == (2, 2) and sim.abs().max() <= 1.0 + 1e-5


def test_itm_and_generation_where_the_family_can(checkpoints):
    images = torch.randn(2, 3, 16, 16)
    clip = vlzoo.load(checkpoints["clip"][1])
    with pytest.raises(CapabilityError, match="clip.*cannot score image-text matches"):
        clip.itm_score(images, TEXTS)
    with pytest.raises(CapabilityError, match="cannot generate"):
        clip.generate(images)
    albef = vlzoo.load(checkpoints["albef"][1])
    score = albef.itm_score(images, TEXTS)
    assert score.shape == (2,) and ((score >= 0) & (score <= 1)).all()
    blip_task, blip_path = checkpoints["blip"]
    blip = vlzoo.load(blip_path)
    assert blip.generate(images) == blip_task.caption(images)
    captions = blip.generate(images, prompt="a picture of ", max_length=3)
    assert len(captions) == 2 and all(len(c.split()) <= 3 for c in captions)
    with pytest.raises(TypeError, match="unknown generation settings.*beams"):
        blip.generate(images, beams=2)
    blip2 = vlzoo.load(checkpoints["blip2"][1])
    assert blip2.encode_image(images).shape == (2, 4, 16)  # one embedding per query
    assert len(blip2.generate(images)) == 2


def test_pil_images_are_preprocessed(checkpoints):
    model = vlzoo.load(checkpoints["clip"][1])
    rgba = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 4), dtype=np.uint8), "RGBA")
    x = model.preprocess(rgba)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert model.encode_image([rgba, rgba.convert("L")]).shape == (2, 16)


def test_a_vlzoo_checkpoint_is_preprocessed_as_its_training_data(checkpoints):
    """A model vlzoo trained keeps vlzoo's pipeline: the data readers' to_rgb and PIL resize, then mean/std."""
    from vlzoo.data.images import decode

    for name in ("clip", "blip"):
        model = vlzoo.load(checkpoints[name][1])
        cfg = model.preprocess_config
        assert model.pipeline.kind == "vlzoo" and model.exif_transpose is True  # upright, as its training data
        for image in (Image.fromarray(np.random.default_rng(0).integers(0, 255, (41, 67, 3), dtype=np.uint8)),
                      Image.fromarray(np.random.default_rng(1).integers(0, 255, (23, 19, 4), dtype=np.uint8), "RGBA")):
            pixels = decode(image, cfg.image_size, cfg.resize_mode).float() / 255.0
            expected = (pixels - torch.tensor(cfg.mean).view(3, 1, 1)) / torch.tensor(cfg.std).view(3, 1, 1)
            torch.testing.assert_close(model.preprocess(image), expected, atol=1e-6, rtol=0)


def test_generation_settings_take_transformers_names(checkpoints):
    from vlzoo.hub.generation import CAPTION_DEFAULTS, generation_config

    config = generation_config({}, "generation", CAPTION_DEFAULTS, {"max_new_tokens": 7, "num_beams": 1})
    assert config.max_length == 7 and config.method == "greedy"
    assert generation_config({}, "generation", CAPTION_DEFAULTS, {"num_beams": 4}).method == "beam"
    with pytest.raises(TypeError, match="either max_new_tokens or max_length"):
        generation_config({}, "generation", CAPTION_DEFAULTS, {"max_new_tokens": 7, "max_length": 9})


def test_a_run_directory_loads_its_checkpoint(checkpoints, tmp_path):
    (tmp_path / "checkpoints").mkdir()
    save_task_checkpoint(checkpoints["clip"][0], tmp_path / "checkpoints" / "last.ckpt")
    assert vlzoo.load(tmp_path).family == "clip"


def test_unknown_reference_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="neither a file or directory nor a manifest name"):
        vlzoo.load("clip-vit-b32-opnai")


def test_hf_reference_loads_from_the_hub_cache_offline(tmp_path, monkeypatch):
    """hf://org/repo through huggingface_hub's cache (layout: blobs, refs/main, snapshot links)."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(text_config=dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, max_position_embeddings=16),
                        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=4, image_size=32, patch_size=16), projection_dim=16)
    reference = CLIPModel(config).eval()
    reference.save_pretrained(tmp_path / "saved")
    commit = "0" * 40
    folder = tmp_path / "hub" / "models--org--tiny-clip"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    for file in (tmp_path / "saved").iterdir():
        blob = folder / "blobs" / file.name.replace(".", "_")
        blob.parent.mkdir(exist_ok=True)
        blob.write_bytes(file.read_bytes())
        link = folder / "snapshots" / commit / file.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(blob)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    model = vlzoo.load("hf://org/tiny-clip")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = reference.get_image_features(pixel_values=images).pooler_output  # projected (B, D)
        expected = torch.nn.functional.normalize(features, dim=-1)
        assert (model.encode_image(images) - expected).abs().max() <= 1e-5
    with pytest.raises(Exception, match="hf://org/missing"):
        vlzoo.load("hf://org/missing")


def test_create_model_builds_blip_vqa_for_a_vqa_entry(tmp_path, monkeypatch):
    """A manifest entry of family blip_vqa whose zoo config is a BLIP task config gets
    the VQA architecture (question encoder + answer decoder), randomly initialised."""
    import dataclasses

    import yaml
    from tiny_configs import tiny_momentum_config

    from vlzoo.config import BLIPConfig

    config = {"model": {"class_path": "vlzoo.tasks.BLIPTask",
                        "init_args": {"model": dataclasses.asdict(tiny_momentum_config(BLIPConfig))}}}
    (tmp_path / "tiny-vqa.yaml").write_text(yaml.safe_dump(config))
    entry = {"name": "blip-tiny-vqa", "family": "blip_vqa", "config": "tiny-vqa.yaml", "format": "hf",
             "source": {"hf": {"repo": "org/tiny-vqa", "files": ["config.json"]}}, "tokenizer": "shapes",
             "preprocess": {"image_size": 16, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic"},
             "license": "MIT", "paper": "https://arxiv.org/abs/2201.12086",
             "metric": {"task": "vqa", "dataset": "shapes", "name": "acc", "value": 0.5, "source": "test"}}
    (tmp_path / "checkpoints_manifest.yaml").write_text(yaml.safe_dump({"checkpoints": [entry]}))
    monkeypatch.setenv("VLZOO_MANIFEST", str(tmp_path / "checkpoints_manifest.yaml"))
    model = vlzoo.create_model("blip-tiny-vqa")
    assert model.family == "blip_vqa" and type(model.model).__name__ == "BLIPVQA"
    assert len(model.vqa(torch.randn(2, 3, 16, 16), ["how many shapes are there?", "what colour?"], max_length=3)) == 2


def test_ids_without_a_mask_pool_like_open_clip(tmp_path):
    """encode_text(ids) with no mask: open_clip's own pooling (EOT = argmax id), even with
    padding after it, as open_clip.tokenize pads."""
    import json

    import open_clip
    from safetensors.torch import save_file

    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    torch.manual_seed(0)
    reference = open_clip.CLIP(**cfg).eval()
    save_file(reference.state_dict(), tmp_path / "open_clip_model.safetensors")
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    model = vlzoo.load(tmp_path)
    ids = open_clip.tokenize(["a photo of a cat", "a red circle left of a blue square"])  # zero-padded to 77
    with torch.no_grad():
        expected = reference.encode_text(ids, normalize=True)
        assert (model.encode_text(ids) - expected).abs().max() <= 1e-5
        assert (model.encode_text(["a photo of a cat", "a red circle left of a blue square"]) - expected
                ).abs().max() <= 1e-5


def test_squash_preprocessing_matches_blips_image_processor():
    """BLIP-family checkpoints resize to S x S (no crop), as transformers' BlipImageProcessor."""
    from transformers import BlipImageProcessor

    from vlzoo.config import VisionConfig
    from vlzoo.data.pipelines import ImagePipeline, build_image_transform

    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (48, 96, 3), dtype=np.uint8))
    processor = BlipImageProcessor(size={"height": 32, "width": 32})
    expected = torch.as_tensor(processor(image, return_tensors="np")["pixel_values"][0])
    squash = build_image_transform(ImagePipeline(), VisionConfig(image_size=32, resize_mode="squash"))(image)
    crop = build_image_transform(ImagePipeline(), VisionConfig(image_size=32, resize_mode="shortest"))(image)
    assert (squash - expected).abs().mean() < 0.05  # interpolation kernels differ slightly (PIL vs torchvision)
    assert (crop - expected).abs().mean() > 4 * (squash - expected).abs().mean()


def test_export_keeps_decoding_settings_and_refuses_foreign_directories(checkpoints, tmp_path, monkeypatch):
    from vlzoo.cli import main

    blip_task, blip_path = checkpoints["blip"]
    out = tmp_path / "blip"
    assert main(["export", str(blip_path), "--out", str(out)]) == 0
    images = torch.randn(2, 3, 16, 16)
    assert vlzoo.load(out).generate(images) == blip_task.caption(images)  # greedy, 6 tokens: the task's settings
    assert main(["export", str(blip_path), "--out", str(out)]) == 0  # an earlier export is replaced
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("keep")
    with pytest.raises(ValueError, match="not an earlier vlzoo export"):
        main(["export", str(blip_path), "--out", str(tmp_path / "notes")])
    monkeypatch.chdir(tmp_path / "notes")
    with pytest.raises(ValueError, match="refusing to export over the working directory"):
        main(["export", str(blip_path), "--out", "."])
    assert (tmp_path / "notes" / "keep.txt").read_text() == "keep"
