"""vlzoo compare: every family under one recipe and budget, seeds with error bars,
learning curves, results written, re-runs skip, interrupted runs continue."""

import json
import math
import shutil
import statistics
from pathlib import Path

import pytest
import torch
import yaml

from vlzoo import families
from vlzoo.budget import Budget, StepCost, parse_budget
from vlzoo.cli import main
from vlzoo.compare import fit_arguments, load_recipe, mean_of, parse_results_table, shared_config

RECIPE = "zoo_configs/recipes/shapes.yaml"
README = Path(__file__).resolve().parents[1] / "README.md"


def tiny_recipe(tmp_path, **overrides):
    recipe = yaml.safe_load(open(RECIPE))
    recipe.update(global_batch=8, curve_points=2)
    recipe["budget"] = {"by": "steps", "steps": 4, "flops": 1.2e10}
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


def effective_config(recipe, name: str, tmp_path, capsys, steps: int = 300) -> dict:
    """What ``vlzoo fit`` parses for model ``name`` (``--print_config``: every layer
    applied, nothing built)."""
    shared = tmp_path / "shared.yaml"
    shared.write_text(yaml.safe_dump(shared_config(recipe, steps, recipe.shared["seed"])))
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main([*fit_arguments(recipe, name, shared, tmp_path / name, None), "--print_config"])
    assert stop.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_the_shipped_recipe_is_valid_and_shares_its_settings(tmp_path, capsys):
    recipe = load_recipe(RECIPE)
    assert list(recipe.models) == ["clip", "albef", "blip", "blip2"]
    assert parse_budget(recipe.shared["budget"], None, RECIPE).kind == "flops"  # equal compute by default
    configs = {n: effective_config(recipe, n, tmp_path, capsys, steps=300) for n in recipe.models}
    for config in configs.values():
        assert config["trainer"]["max_steps"] == 300
        assert config["trainer"]["val_check_interval"] == math.ceil(300 / recipe.shared["curve_points"])
        assert config["data"]["batch_size"] == recipe.shared["global_batch"]
        assert config["data"]["shapes"]["image_size"] == recipe.shared["data"]["shapes"]["image_size"]
        optim = config["model"]["init_args"]["optim"]
        assert {k: optim[k] for k in recipe.shared["optimizer"]} == {
            k: list(v) if isinstance(v, tuple) else v for k, v in recipe.shared["optimizer"].items()}
        assert config["model"]["init_args"]["eval"]["rerank_k"] == recipe.shared["eval"]["rerank_k"]
        assert config["seed_everything"] == recipe.shared["seed"]
    assert configs["albef"]["model"]["init_args"]["model"]["fusion_layers"] == 2  # the model's own, kept


def test_budgets_give_steps():
    cost = StepCost(flops=2.0e9, seconds=0.5)
    assert Budget("steps", 300).steps(64) == 300
    assert Budget("samples", 6400).steps(64) == 100
    assert Budget("flops", 1.0e12).steps(64, cost) == 500
    assert Budget("wall_time", 60).steps(64, cost) == 120
    with pytest.raises(ValueError, match="needs the model's measured step cost"):
        Budget("flops", 1.0e12).steps(64)
    recipe_budget = {"by": "flops", "flops": 3e13, "steps": 300}
    assert parse_budget(recipe_budget, None, "r.yaml") == Budget("flops", 3e13)
    assert parse_budget(recipe_budget, "steps", "r.yaml") == Budget("steps", 300)
    assert parse_budget(recipe_budget, "samples=640", "r.yaml") == Budget("samples", 640)
    with pytest.raises(ValueError, match="budget.wall_time is not set"):
        parse_budget(recipe_budget, "wall_time", "r.yaml")
    with pytest.raises(ValueError, match="--budget gpus"):
        parse_budget(recipe_budget, "gpus", "r.yaml")
    with pytest.raises(ValueError, match="r.yaml: budget.by"):
        parse_budget({"by": "epochs"}, None, "r.yaml")
    with pytest.raises(ValueError, match="budget.flops: expected a positive number"):
        parse_budget({"by": "flops", "flops": -1}, None, "r.yaml")


def test_compare_runs_every_family_and_skips_finished_ones(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path)
    out = tmp_path / "out"
    assert main(["compare", "--recipe", str(recipe), "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["models"]) == {"clip", "albef", "blip", "blip2"}
    for name, r in results["models"].items():
        assert 0.0 <= r["metrics"]["test/r1_t2i"] <= 1.0, name
        assert r["params_total"] > 0 and r["train_samples_per_s"] > 0 and r["peak_memory_mb"] > 0
        assert r["steps"] == 4 and r["samples"] == 32 and r["flops"] == 4 * r["flops_per_step"] > 0
        assert r["effective_settings"]["trainer"]["max_steps"] == 4
        assert r["effective_settings"]["trainer"]["val_check_interval"] == 2  # the last validation at the end
    flops = {n: r["flops_per_step"] for n, r in results["models"].items()}
    assert flops["albef"] > 2 * flops["clip"] and flops["blip"] > 2 * flops["clip"]  # momentum copies, ITM, MLM/LM
    assert "test/bleu4" in results["models"]["blip"]["metrics"]
    blip2 = results["models"]["blip2"]
    assert blip2["params_trainable"] < blip2["params_total"]  # the frozen tower of the compare's CLIP
    assert str(out / "runs" / "clip" / "seed-0") in blip2["effective_settings"]["model"]["init_args"]["model"][
        "vision"]["name"]
    table = parse_results_table((out / "results.md").read_text())
    assert set(table) == {"clip", "albef", "blip", "blip2"}
    assert mean_of(table["clip"]["r1_t2i"]) == pytest.approx(results["models"]["clip"]["metrics"]["test/r1_t2i"],
                                                            abs=5e-4)
    assert "not tested against noise" in (out / "results.md").read_text()  # one seed: no error bars claimed
    for name in ("albef", "blip", "blip2"):  # what they start from, and its cost, is said
        assert f"- {name}: the vision tower of clip (" in (out / "results.md").read_text()
    assert (out / "comparison.png").stat().st_size > 10_000 and (out / "curves.png").stat().st_size > 10_000
    capsys.readouterr()
    assert main(["compare", "--recipe", str(recipe), "--out", str(out), "--models", "clip,blip2"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("finished before, skipped") == 2


def test_seeds_and_a_flops_budget_give_means_deviations_and_curves(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path)
    out = tmp_path / "out"
    assert main(["compare", "--recipe", str(recipe), "--out", str(out), "--models", "clip,blip2",
                 "--seeds", "3", "--budget", "flops"]) == 0
    results = json.loads((out / "results.json").read_text())
    plan = json.loads((out / "plan.json").read_text())
    assert results["budget"] == {"kind": "flops", "amount": 1.2e10}
    for name in ("clip", "blip2"):
        r = results["models"][name]
        per_step = plan["models"][name]["flops_per_step"]
        budget_steps = int(1.2e10 // per_step)
        assert r["steps"] == budget_steps - budget_steps % 2 > 1 and r["flops"] <= 1.2e10  # the budget, not more
        assert r["seeds"] == [0, 1, 2] and len(r["runs"]) == 3
        values = [run["metrics"]["test/r1_t2i"] for run in r["runs"].values()]
        assert r["metrics"]["test/r1_t2i"] == pytest.approx(statistics.fmean(values))
        assert r["std"]["test/r1_t2i"] == pytest.approx(statistics.stdev(values))
        for seed, run in r["runs"].items():
            assert Path(run["run_dir"]).name == f"seed-{seed}"
            assert run["effective_settings"]["seed_everything"] == int(seed)
            rows = (Path(run["run_dir"]) / "metrics.csv").read_text()
            assert "train/elapsed_s" in rows.splitlines()[0]  # the time axis of the curves
        assert "val/r1_t2i" in r["runs"]["0"]["metrics"]
    for seed in (0, 1, 2):  # BLIP-2 seed s reads the tower of CLIP seed s
        vision = results["models"]["blip2"]["runs"][str(seed)]["effective_settings"]["model"]["init_args"]["model"][
            "vision"]["name"]
        assert f"clip/seed-{seed}/" in vision
    assert plan["models"]["clip"]["steps"] != plan["models"]["blip2"]["steps"]  # equal FLOPs, not equal steps
    text = (out / "results.md").read_text()
    table = parse_results_table(text)
    assert table["clip"]["seeds"] == "3" and "±" in table["clip"]["r1_t2i"]
    assert "- clip - blip2:" in text and ("within noise" in text or "beyond noise" in text)
    assert "GFLOP/step" in text and "PFLOP" in text
    assert (out / "curves.png").stat().st_size > 20_000
    capsys.readouterr()
    assert main(["compare", "--recipe", str(recipe), "--out", str(out), "--models", "clip,blip2",
                 "--seeds", "3", "--budget", "flops"]) == 0
    assert capsys.readouterr().out.count("finished before, skipped") == 6
    with pytest.raises(ValueError, match="was run with budget"):
        main(["compare", "--recipe", str(recipe), "--out", str(out), "--models", "clip", "--budget", "steps"])


def test_bad_recipes_are_named(tmp_path):
    bad = yaml.safe_load(open(RECIPE))
    bad["models"]["blip2"]["vision_from"] = "nope"
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(ValueError, match="vision_from 'nope'"):
        load_recipe(tmp_path / "r.yaml")
    old = yaml.safe_load(open(RECIPE))
    old["steps"] = 300
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(old))
    with pytest.raises(ValueError, match="old.yaml: steps: the budget is now a mapping"):
        load_recipe(tmp_path / "old.yaml")
    with pytest.raises(ValueError, match="--models \\['vit'\\]"):
        main(["compare", "--recipe", RECIPE, "--out", str(tmp_path / "o"), "--models", "vit"])
    with pytest.raises(ValueError, match="include clip in --models"):
        main(["compare", "--recipe", RECIPE, "--out", str(tmp_path / "o"), "--models", "blip2"])


def test_an_interrupted_model_continues_from_its_checkpoint(tmp_path, capsys, monkeypatch):
    import os

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
    run = out / "runs" / "clip" / "seed-0"
    last = run / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 2 and (run / "compare_wall.json").is_file()
    capsys.readouterr()
    assert main(["compare", "--recipe", str(tiny_recipe(tmp_path)), "--out", str(out), "--models", "clip"]) == 0
    assert "continuing the interrupted run from its last checkpoint" in capsys.readouterr().out
    assert torch.load(last, weights_only=False)["global_step"] == 4
    assert not (run / "compare_wall.json").exists()
    changed = yaml.safe_load(tiny_recipe(tmp_path).read_text())
    changed["models"]["clip"]["overrides"]["model.init_args.model.embed_dim"] = 32
    (tmp_path / "changed.yaml").write_text(yaml.safe_dump(changed, sort_keys=False))
    with pytest.raises(ValueError, match="plan.json: models.clip was planned with other settings"):
        main(["compare", "--recipe", str(tmp_path / "changed.yaml"), "--out", str(out), "--models", "clip"])


def test_a_moved_output_folder_still_feeds_blip2_its_tower(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path)
    assert main(["compare", "--recipe", str(recipe), "--out", str(tmp_path / "first"), "--models", "clip"]) == 0
    moved = tmp_path / "moved"
    shutil.move(tmp_path / "first", moved)
    assert main(["compare", "--recipe", str(recipe), "--out", str(moved), "--models", "clip,blip2"]) == 0
    vision = json.loads((moved / "results.json").read_text())["models"]["blip2"]["effective_settings"]["model"][
        "init_args"]["model"]["vision"]["name"]
    assert vision.startswith(str(moved / "runs" / "clip" / "seed-0" / "checkpoints"))


def test_the_readme_quotes_a_results_table_naming_every_family():
    text = README.read_text()
    table = parse_results_table(text)
    for family in ("clip", "albef", "blip", "blip2"):
        assert family in families.names()
        assert family in table, f"README's compare table has no row {family!r}"
        assert 0.0 <= mean_of(table[family]["r1_t2i"]) <= 1.0
    assert "results.md" in text and "/usr/bin/time" in text
