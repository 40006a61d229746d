"""vlzoo compare: four families under one tiny recipe, results written, re-runs skip."""

import json
from pathlib import Path

import pytest
import yaml

from vlzoo.cli import main
from vlzoo.compare import fit_arguments, load_recipe, shared_config

RECIPE = "zoo_configs/recipes/shapes.yaml"


def tiny_recipe(tmp_path, **overrides):
    recipe = yaml.safe_load(open(RECIPE))
    recipe.update(steps=3, global_batch=8)
    recipe["data"]["shapes"] = {"image_size": 64, "train_size": 64, "val_size": 16, "test_size": 16}
    recipe["eval"] = {"rerank_k": 4}
    for name in recipe["models"]:  # keep each family's architecture, make its evaluation cheap
        recipe["models"][name]["config"] = str(Path(recipe["models"][name]["config"]).resolve())
        recipe["models"][name]["overrides"] = {"trainer.log_every_n_steps": 1,
                                               "trainer.enable_progress_bar": False}
    recipe["models"]["blip"]["overrides"]["model.init_args.generation"] = {"method": "greedy", "max_length": 5}
    recipe["models"]["albef"]["overrides"]["model.init_args.model.queue_size"] = 16
    recipe.update(overrides)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def effective_config(recipe, name: str, tmp_path, capsys) -> dict:
    """What ``vlzoo fit`` parses for model ``name`` (``--print_config``: every layer
    applied, nothing built)."""
    shared = tmp_path / "shared.yaml"
    shared.write_text(yaml.safe_dump(shared_config(recipe)))
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main([*fit_arguments(recipe, name, shared, tmp_path / name, None), "--print_config"])
    assert stop.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_the_shipped_recipe_is_valid_and_shares_its_settings(tmp_path, capsys):
    recipe = load_recipe(RECIPE)
    assert list(recipe.models) == ["clip", "albef", "blip", "blip2"]
    configs = {n: effective_config(recipe, n, tmp_path, capsys) for n in recipe.models}
    for config in configs.values():
        assert config["trainer"]["max_steps"] == recipe.shared["steps"]
        assert config["data"]["batch_size"] == recipe.shared["global_batch"]
        assert config["data"]["shapes"]["image_size"] == recipe.shared["data"]["shapes"]["image_size"]
        optim = config["model"]["init_args"]["optim"]
        assert {k: optim[k] for k in recipe.shared["optimizer"]} == {
            k: list(v) if isinstance(v, tuple) else v for k, v in recipe.shared["optimizer"].items()}
        assert config["model"]["init_args"]["eval"]["rerank_k"] == recipe.shared["eval"]["rerank_k"]
        assert config["seed_everything"] == recipe.shared["seed"]
    assert configs["albef"]["model"]["init_args"]["model"]["queue_size"] % recipe.shared["global_batch"] == 0
    assert configs["albef"]["model"]["init_args"]["model"]["fusion_layers"] == 2  # the model's own, kept


def test_compare_runs_every_family_and_skips_finished_ones(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path)
    out = tmp_path / "out"
    assert main(["compare", "--recipe", str(recipe), "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["models"]) == {"clip", "albef", "blip", "blip2"}
    for name, r in results["models"].items():
        assert 0.0 <= r["metrics"]["test/r1_t2i"] <= 1.0, name
        assert r["params_total"] > 0 and r["train_samples_per_s"] > 0 and r["peak_memory_mb"] > 0
        assert r["effective_settings"]["trainer"]["max_steps"] == 3
    assert "test/bleu4" in results["models"]["blip"]["metrics"]
    blip2 = results["models"]["blip2"]
    assert blip2["params_trainable"] < blip2["params_total"]  # the frozen tower of the compare's CLIP
    assert str(out / "runs" / "clip") in blip2["effective_settings"]["model"]["init_args"]["model"]["vision"]["name"]
    assert "| clip |" in (out / "results.md").read_text()
    assert (out / "comparison.png").stat().st_size > 10_000
    capsys.readouterr()
    assert main(["compare", "--recipe", str(recipe), "--out", str(out), "--models", "clip,blip2"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("finished before, skipped") == 2


def test_bad_recipes_are_named(tmp_path):
    with pytest.raises(ValueError, match="vision_from 'nope'"):
        bad = yaml.safe_load(open(RECIPE))
        bad["models"]["blip2"]["vision_from"] = "nope"
        (tmp_path / "r.yaml").write_text(yaml.safe_dump(bad))
        load_recipe(tmp_path / "r.yaml")
    with pytest.raises(ValueError, match="--models \\['vit'\\]"):
        main(["compare", "--recipe", RECIPE, "--out", str(tmp_path / "o"), "--models", "vit"])
    with pytest.raises(ValueError, match="include clip in --models"):
        main(["compare", "--recipe", RECIPE, "--out", str(tmp_path / "o"), "--models", "blip2"])


def test_an_interrupted_model_continues_from_its_checkpoint(tmp_path, capsys, monkeypatch):
    import os

    import torch

    tests = str(Path(__file__).resolve().parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH")) if p))
    recipe = yaml.safe_load(tiny_recipe(tmp_path).read_text())
    recipe["models"]["clip"]["overrides"]["trainer.callbacks"] = [
        {"class_path": "sigterm_at.SigintAt", "init_args": {"step": 2}}]  # as if Ctrl-C at step 2
    interrupted = tmp_path / "interrupted.yaml"
    interrupted.write_text(yaml.safe_dump(recipe, sort_keys=False))
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="clip failed \\(exit 130\\)"):
        main(["compare", "--recipe", str(interrupted), "--out", str(out), "--models", "clip"])
    last = out / "runs" / "clip" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 2 and (out / "runs/clip/compare_wall.json").is_file()
    capsys.readouterr()
    assert main(["compare", "--recipe", str(tiny_recipe(tmp_path)), "--out", str(out), "--models", "clip"]) == 0
    assert "continuing the interrupted run from its last checkpoint" in capsys.readouterr().out
    assert torch.load(last, weights_only=False)["global_step"] == 3
    assert not (out / "runs/clip/compare_wall.json").exists()
