import json
import subprocess
import sys
from pathlib import Path

import pytest

from vlzoo import __version__
from vlzoo.cli import main

CONFIG = Path(__file__).resolve().parents[1] / "zoo_configs/models/clip/shapes-tiny.yaml"


def test_help_and_version():
    out = subprocess.run([sys.executable, "-m", "vlzoo.cli", "--help"], capture_output=True, text=True, check=True)
    for command in ("fit", "validate", "test", "predict", "data"):
        assert command in out.stdout
    out = subprocess.run([sys.executable, "-m", "vlzoo.cli", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"vlzoo {__version__}"


def test_data_export(tmp_path):
    assert main(["data", "export", "shapes", "--split", "test", "--limit", "4", "--out", str(tmp_path)]) == 0
    rows = (tmp_path / "captions.jsonl").read_text().splitlines()
    assert len(rows) == 4 and (tmp_path / json.loads(rows[0])["image"]).exists()


def test_fit_writes_the_run_directory(tmp_path):
    run = tmp_path / "run"
    main([
        "fit", "--config", str(CONFIG),
        "--trainer.default_root_dir", str(run),
        "--trainer.max_steps", "6", "--trainer.val_check_interval", "3",
        "--trainer.enable_progress_bar", "false",
        "--data.batch_size", "16", "--data.shapes.train_size", "96",
        "--data.shapes.val_size", "32", "--data.shapes.test_size", "32",
    ])
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("train/loss", "val/r1_t2i", "test/r1_t2i", "test/r10_i2t", "test/compositional_acc",
                "test/zeroshot_acc", "train/samples_per_s", "params_total", "params_trainable", "peak_memory_mb"):
        assert key in metrics, key
    assert (run / "loss.png").stat().st_size > 1000
    assert (run / "metrics.csv").exists()
    assert (run / "checkpoints" / "last.ckpt").exists()
    assert metrics["best_checkpoint"] and Path(metrics["best_checkpoint"]).exists()


def test_unknown_source_is_a_clear_error(tmp_path):
    from vlzoo.data.datamodule import VLDataModule

    with pytest.raises(ValueError, match="data.train: no such file coco.json"):
        VLDataModule(train="coco.json").source("train")
    with pytest.raises(ValueError, match="data.val: no such file or folder 'nothing-here'"):
        VLDataModule(val="nothing-here").source("val")


@pytest.mark.parametrize("option, value", [("--data.batch_size", "-4"), ("--data.batch_size", "0"),
                                           ("--trainer.max_steps", "-5"), ("--checkpoint.every_n_steps", "0")])
def test_a_bad_numeric_option_is_refused_at_once_naming_it(option, value):
    import time

    config = Path(__file__).resolve().parents[1] / "zoo_configs/models/clip/shapes-tiny.yaml"
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "vlzoo.cli", "fit", "--config", str(config), option, value],
                          capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - start
    assert done.returncode == 2 and elapsed < 5, (done.returncode, elapsed)
    lines = done.stderr.splitlines()
    assert lines[0].startswith(f"vlzoo fit: error: {option}: {value}") and len(lines) == 2, lines
    assert "vlzoo fit --help" in lines[1]


def test_a_bad_numeric_option_in_a_config_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  shapes:\n    train_size: 0\n")
    assert main(["fit", "--config", str(bad)]) == 2
