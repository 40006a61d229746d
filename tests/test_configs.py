"""Every YAML under zoo_configs/ parses against the typed signatures of the CLI."""

from pathlib import Path

import pytest
from jsonargparse import ActionConfigFile
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser

from vlzoo.config import (
    ALBEFConfig,
    BLIP2Config,
    BLIP2LLMConfig,
    BLIPConfig,
    CausalLMConfig,
    CLIPConfig,
    load_yaml_section,
)
from vlzoo.data.datamodule import VLDataModule
from vlzoo.tasks.base import VLTask

ROOT = Path(__file__).resolve().parents[1] / "zoo_configs"
CONFIGS = sorted(p for p in ROOT.rglob("*.yaml")
                 if "recipes" not in p.parts and "tasks" not in p.parts)  # recipes: tests/test_compare.py
TASK_RECIPES = sorted((ROOT / "tasks").rglob("*.yaml"))


def cli_parser() -> LightningArgumentParser:
    parser = LightningArgumentParser(parser_mode="omegaconf+", exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_argument("--seed_everything", type=int | bool, default=0)
    parser.add_lightning_class_args(Trainer, "trainer")
    parser.add_lightning_class_args(VLTask, "model", subclass_mode=True)
    parser.add_lightning_class_args(VLDataModule, "data")
    return parser


def test_there_are_configs():
    assert CONFIGS, ROOT


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_zoo_config_parses(path):
    cfg = cli_parser().parse_path(str(path))
    assert cfg.model.class_path.startswith("vlzoo.tasks.")
    schemas = {"CLIPTask": CLIPConfig, "ALBEFTask": ALBEFConfig, "BLIPTask": BLIPConfig, "BLIP2Task": BLIP2Config,
               "BLIP2LLMTask": BLIP2LLMConfig, "CausalLMTask": CausalLMConfig}
    schema = schemas[cfg.model.class_path.rpartition(".")[2]]
    typed = load_yaml_section(path, "model.init_args.model", schema)
    assert isinstance(typed, schema) and getattr(typed, "embed_dim", 1) > 0


def test_a_wrong_field_is_rejected_with_its_name(tmp_path):
    bad = tmp_path / "bad.yaml"
    text = (ROOT / "models/clip/shapes-tiny.yaml").read_text().replace("embed_dim: 128", "embed_dims: 128")
    bad.write_text(text)
    with pytest.raises(Exception, match="embed_dims"):
        cli_parser().parse_path(str(bad))
    with pytest.raises(ValueError, match="embed_dims"):
        load_yaml_section(bad, "model.init_args.model", CLIPConfig)


def test_there_are_task_recipes_for_each_task():
    from vlzoo.recipes import TASKS

    assert {p.parent.name for p in TASK_RECIPES} == set(TASKS)


@pytest.mark.parametrize("path", TASK_RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_task_recipe_parses_with_a_model(path, tmp_path):
    """A recipe plus the starting model's layer (as ``vlzoo finetune`` layers them) is a valid run config."""
    import yaml

    from vlzoo.recipes import start_config

    family = path.stem.removesuffix("-shapes")
    schema = {"clip": CLIPConfig, "albef": ALBEFConfig, "blip": BLIPConfig, "blip2": BLIP2Config,
              "blip2_llm": BLIP2LLMConfig}[family]
    layer = tmp_path / "start.yaml"
    layer.write_text(yaml.safe_dump(start_config(path, schema(), "some-checkpoint.ckpt", "runs/x")))
    cfg = cli_parser().parse_args(["--config", str(path), "--config", str(layer)])
    assert cfg.model.init_args.finetune.init_from == "some-checkpoint.ckpt"
    assert cfg.trainer.default_root_dir == "runs/x"


def test_the_data_module_gets_the_models_inputs_by_a_link():
    """``vlzoo fit`` links ``data.inputs`` from the instantiated model: the tokenizer and
    preprocessing are the model's, and ``data.inputs`` is no option of its own."""
    from vlzoo.cli import link_model_inputs

    parser = cli_parser()
    link_model_inputs(parser)
    config = ROOT / "models/clip/shapes-tiny.yaml"
    init = parser.instantiate_classes(parser.parse_path(str(config)))
    inputs = init.data.inputs
    assert inputs.tokenizer is init.model.tokenizer
    assert (inputs.image_size, tuple(inputs.mean)) == (init.model.preprocess_config.image_size,
                                                       tuple(init.model.preprocess_config.mean))
    with pytest.raises(Exception, match="inputs"):
        parser.parse_args(["--config", str(config), "--data.inputs", "x"])

