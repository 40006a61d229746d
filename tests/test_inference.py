"""Every inference command end to end on tiny checkpoints made here (random weights:
these check the plumbing, batching, output formats and errors, not answer quality)."""

import json

import pytest
from safetensors import safe_open
from tiny_configs import save_task_checkpoint, tiny_momentum_config, tiny_task

from vlzoo.cli import main
from vlzoo.config import BLIPConfig
from vlzoo.models.generation import GenerationConfig
from vlzoo.tasks import BLIPVQATask


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    vqa = BLIPVQATask(tiny_momentum_config(BLIPConfig), generation=GenerationConfig(method="greedy", max_length=4))
    return {name: str(save_task_checkpoint(task, root / f"{name}.ckpt"))
            for name, task in (("clip", tiny_task("clip")), ("blip", tiny_task("blip")), ("vqa", vqa))}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    out = tmp_path_factory.mktemp("images")
    assert main(["data", "export", "shapes", "--split", "test", "--limit", "5", "--image-size", "16",
                 "--out", str(out)]) == 0
    (out / "images" / "broken.png").write_bytes(b"not a png")
    return out / "images"


def run_json(capsys, argv):
    capsys.readouterr()
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_caption_batches_and_skips_bad_images(checkpoints, images, capsys):
    out = run_json(capsys, ["caption", str(images), "--model", checkpoints["blip"], "--batch-size", "2",
                            "--method", "greedy", "--max-length", "4"])
    assert len(out["results"]) == 5 and all(isinstance(r["caption"], str) for r in out["results"])
    assert len(out["skipped"]) == 1 and "broken.png" in out["skipped"][0]
    assert main(["caption", str(images / "000000.png"), "--model", checkpoints["blip"], "--max-length", "3"]) == 0
    assert capsys.readouterr().out.startswith(str(images / "000000.png") + ": ")


def test_vqa_answers_each_image(checkpoints, images, capsys):
    out = run_json(capsys, ["vqa", str(images / "000000.png"), str(images / "000001.png"),
                            "how many shapes are there?", "--model", checkpoints["vqa"]])
    assert [r["question"] for r in out["results"]] == ["how many shapes are there?"] * 2
    assert all(isinstance(r["answer"], str) for r in out["results"])


def test_retrieve_ranks_all_images_by_score(checkpoints, images, capsys):
    out = run_json(capsys, ["retrieve", "--images", str(images), "--query", "a red circle", "--top", "3",
                            "--model", checkpoints["clip"]])
    scores = [r["score"] for r in out["results"]]
    assert [r["rank"] for r in out["results"]] == [1, 2, 3] and scores == sorted(scores, reverse=True)


def test_zeroshot_gives_a_distribution_over_the_labels(checkpoints, images, capsys):
    out = run_json(capsys, ["zeroshot", str(images), "--labels", "red circle, blue square,green triangle",
                            "--model", checkpoints["clip"]])
    for row in out["results"]:
        assert set(row["probabilities"]) == {"red circle", "blue square", "green triangle"}
        assert abs(sum(row["probabilities"].values()) - 1) < 1e-3
        assert row["label"] == max(row["probabilities"], key=row["probabilities"].get)


def test_embed_writes_safetensors_with_image_names(checkpoints, images, tmp_path, capsys):
    out_file = tmp_path / "emb.safetensors"
    out = run_json(capsys, ["embed", "--images", str(images), "--out", str(out_file), "--model", checkpoints["clip"]])
    assert out["results"]["images"] == 5
    with safe_open(str(out_file), "pt") as f:
        assert f.get_tensor("image_embeds").shape == (5, 16)
        assert len(json.loads(f.metadata()["images"])) == 5


def test_a_family_without_the_capability_says_so(checkpoints, images, capsys):
    with pytest.raises(NotImplementedError, match="cannot caption images"):
        main(["caption", str(images), "--model", checkpoints["clip"]])
    with pytest.raises(NotImplementedError, match="cannot answer questions"):
        main(["vqa", str(images), "what?", "--model", checkpoints["blip"]])


@pytest.mark.parametrize("command", ["caption", "vqa", "retrieve", "zeroshot", "embed", "finetune"])
def test_help_shows_an_example(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert "example:" in lines and lines[lines.index("example:") + 1].startswith(f"  vlzoo {command} ")
