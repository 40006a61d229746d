"""Loading task checkpoints safely: only vlzoo's own task classes (nothing a file names
is imported), no plain pickles, no NaN weights, every refusal naming the file."""

import pickle
import sys

import pytest
import torch
from tiny_configs import save_task_checkpoint, tiny_task

from vlzoo.checkpoints import read_checkpoint
from vlzoo.families import load_task
from vlzoo.hub.loaders import task_from_zoo_config
from vlzoo.weights import load_strict


@pytest.fixture()
def planted_module(tmp_path, monkeypatch):
    """A module beside the working directory that leaves a mark when imported."""
    mark = tmp_path / "imported"
    (tmp_path / "planted_module.py").write_text(f"open({str(mark)!r}, 'w').close()\nclass SomeClass: pass\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield mark
    sys.modules.pop("planted_module", None)


@pytest.mark.parametrize("where", ["vlzoo_task", "_class_path"])
@pytest.mark.parametrize("name", ["planted_module.SomeClass", "this.Nothing"])
def test_a_checkpoint_naming_a_foreign_module_is_refused_unimported(tmp_path, planted_module, where, name):
    path = save_task_checkpoint(tiny_task("clip"), tmp_path / "task.ckpt")
    checkpoint = torch.load(path, weights_only=False)
    if where == "vlzoo_task":
        checkpoint["vlzoo_task"] = name
    else:
        checkpoint["hyper_parameters"]["_class_path"] = name
    torch.save(checkpoint, path)
    module = name.partition(".")[0]
    was_loaded = module in sys.modules
    with pytest.raises(ValueError, match=f"{path}: .*names the task '{name}', which is not a vlzoo task"):
        load_task(path)
    assert not planted_module.exists() and (was_loaded or module not in sys.modules)


def test_a_zoo_config_naming_a_foreign_class_is_refused_unimported(tmp_path, planted_module):
    config = tmp_path / "model.yaml"
    config.write_text("model:\n  class_path: planted_module.SomeClass\n  init_args: {}\n")
    with pytest.raises(ValueError, match="model.class_path: names the task 'planted_module.SomeClass'"):
        task_from_zoo_config(config)
    assert not planted_module.exists() and "planted_module" not in sys.modules


def test_a_plain_pickle_is_named_as_such(tmp_path):
    path = tmp_path / "old.ckpt"
    path.write_bytes(pickle.dumps({"state_dict": {}}))
    with pytest.raises(ValueError, match=f"{path}: not a vlzoo/Lightning checkpoint.*plain pickle"):
        read_checkpoint(path, mmap=True)


def test_nan_weights_are_refused_with_their_names(tmp_path):
    task = tiny_task("clip")
    with torch.no_grad():
        task.model.logit_scale.fill_(float("nan"))
        next(task.model.vision.parameters()).view(-1)[0] = float("inf")
    path = save_task_checkpoint(task, tmp_path / "task.ckpt")
    with pytest.raises(ValueError, match=r"2 tensor\(s\) hold NaN or infinite values: \[.*model.logit_scale"):
        load_task(path)
    fresh = tiny_task("clip").model
    with pytest.raises(ValueError, match="logit_scale"):
        load_strict(fresh, task.model.state_dict(), source="weights.safetensors")
