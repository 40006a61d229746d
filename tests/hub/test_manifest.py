"""checkpoints_manifest.yaml: every entry valid; bad entries named; loading a manifest
name through fetch (file:// sources with sha256, an offline hub source)."""

import hashlib
import json

import pytest
import torch
import yaml
from tiny_configs import save_task_checkpoint, tiny_task

import vlzoo
from vlzoo.cli import main
from vlzoo.hub.download import CheckpointUnavailableError, ChecksumError
from vlzoo.hub.manifest import ManifestError, manifest_path, parse_manifest, repo_root

REQUIRED_NAMES = [
    "clip-vit-b32-openai", "clip-vit-b16-openai", "clip-vit-l14-openai", "clip-rn50-openai",
    "albef-", "blip-", "blip2-",
]
PREPROCESS = {"image_size": 16, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic"}
METRIC = {"task": "retrieval", "dataset": "shapes", "name": "r1_t2i", "value": 0.5, "source": "test"}


def test_the_repository_manifest_is_valid():
    entries = parse_manifest(yaml.safe_load((repo_root() / "checkpoints_manifest.yaml").read_text()), repo_root())
    names = sorted(entries)
    for required in REQUIRED_NAMES:
        assert any(n.startswith(required) for n in names), required
    families = {e.family for e in entries.values()}
    assert {"clip", "albef", "blip", "blip_vqa", "blip2", "blip2_llm"} <= families
    sources = {next(iter(e.source)) for e in entries.values()}
    assert {"hf", "url", "open_clip", "zoo"} <= sources
    assert len([n for n in names if n.startswith("clip-") and "laion" in n]) >= 2
    assert vlzoo.list_models("blip2-*") == [n for n in names if n.startswith("blip2-")]


def _entry(**overrides):
    entry = {"name": "clip-test", "family": "clip", "config": "tiny.yaml", "format": "vlzoo",
             "source": {"url": "file:///nowhere/x.ckpt"}, "preprocess": PREPROCESS, "tokenizer": "shapes",
             "license": "MIT", "paper": "https://arxiv.org/abs/2103.00020", "metric": METRIC}
    return {**entry, **overrides}


@pytest.mark.parametrize("change, message", [
    ({"name": "CLIP test"}, "entry 'CLIP test'.name"),
    ({"name": "vit-b32"}, "starting with one of"),
    ({"family": "flamingo"}, "family: expected one of"),
    ({"source": {"ftp": "x"}}, "source: expected exactly one of"),
    ({"source": {"hf": {"repo": "no-slash", "files": ["a"]}}}, "source.hf.repo"),
    ({"preprocess": {**PREPROCESS, "mean": [0.5]}}, "preprocess.mean: expected three numbers"),
    ({"metric": {**METRIC, "value": "high"}}, "metric.value: expected a number"),
    ({"sha256": {"x.ckpt": "abc"}}, "sha256: expected a mapping file -> 64"),
    ({"licence": "MIT"}, "unknown fields \\['licence'\\]"),
])
def test_a_bad_entry_names_the_entry_and_field(change, message):
    with pytest.raises(ManifestError, match=message):
        parse_manifest({"checkpoints": [_entry(**change)]})


def test_missing_field_and_duplicates_are_named():
    entry = _entry()
    del entry["license"]
    with pytest.raises(ManifestError, match=r"entry 'clip-test': missing fields \['license'\]"):
        parse_manifest({"checkpoints": [entry]})
    with pytest.raises(ManifestError, match="appears twice"):
        parse_manifest({"checkpoints": [_entry(), _entry()]})


@pytest.fixture()
def local_manifest(tmp_path, monkeypatch):
    """A manifest of a tiny CLIP served from a file:// URL with its sha256, plus an
    entry on the hub (which tests run offline)."""
    torch.manual_seed(0)
    task = tiny_task("clip")
    (tmp_path / "served").mkdir()
    checkpoint = save_task_checkpoint(task, tmp_path / "served" / "clip.ckpt")
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    config = {"model": {"class_path": "vlzoo.tasks.CLIPTask",
                        "init_args": {"model": json.loads(json.dumps(_dataclass_dict(task.config)))}}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(config))
    url = checkpoint.as_uri()
    entries = [
        _entry(name="clip-tiny-local", source={"url": url}, sha256={"clip.ckpt": digest}),
        _entry(name="clip-tiny-corrupt", source={"url": url}, sha256={"clip.ckpt": "0" * 64}),
        _entry(name="clip-tiny-hub", format="hf", source={"hf": {"repo": "vlzoo-test/clip-tiny",
                                                                 "files": ["config.json", "model.safetensors"]}}),
    ]
    (tmp_path / "checkpoints_manifest.yaml").write_text(yaml.safe_dump({"checkpoints": entries}))
    monkeypatch.setenv("VLZOO_MANIFEST", str(tmp_path / "checkpoints_manifest.yaml"))
    return task


def _dataclass_dict(config):
    import dataclasses

    return dataclasses.asdict(config)


def test_load_a_manifest_name_verifies_and_caches(local_manifest, capsys):
    assert manifest_path().name == "checkpoints_manifest.yaml"
    model = vlzoo.load("clip-tiny-local")
    assert model.source == "clip-tiny-local" and model.family == "clip"
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), local_manifest.model.encode_image(images))
    with pytest.raises(ChecksumError, match="clip.ckpt"):
        vlzoo.load("clip-tiny-corrupt")
    random_init = vlzoo.create_model("clip-tiny-local")
    assert random_init.family == "clip"
    assert not torch.equal(random_init.encode_image(images), model.encode_image(images))
    assert main(["list", "tiny"]) == 0
    listed = capsys.readouterr().out
    assert "clip-tiny-local" in listed and "3 checkpoints" in listed
    assert main(["download", "clip-tiny-local"]) == 0


def test_offline_and_not_cached_names_the_checkpoint_source_and_cache(local_manifest):
    with pytest.raises(CheckpointUnavailableError) as err:
        vlzoo.load("clip-tiny-hub")
    message = str(err.value)
    assert "clip-tiny-hub" in message and "huggingface.co/vlzoo-test/clip-tiny" in message
    assert "cache:" in message


def test_a_digest_for_a_file_the_source_never_fetches_is_refused():
    with pytest.raises(ManifestError, match=r"\['ViT-B-32.pt'\] are not files this source fetches"):
        parse_manifest({"checkpoints": [_entry(format="open_clip", source={"open_clip": {"name": "ViT-B-32",
                                                                                          "tag": "openai"}},
                                               sha256={"ViT-B-32.pt": "a" * 64})]})
    entry = _entry(source={"hf": {"repo": "org/x", "files": [["model.safetensors", "pytorch_model.bin"]]}},
                   sha256={"pytorch_model.bin": "b" * 64}, format="hf")
    assert parse_manifest({"checkpoints": [entry]})["clip-test"].sha256 == {"pytorch_model.bin": "b" * 64}
