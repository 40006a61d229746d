"""The first hour at the command line: instant help and listing (no torch, Lightning,
transformers or open_clip imported), examples printed verbatim, one-line errors with
the closest valid option, and the short help of the Lightning commands naming only real
options."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vlzoo.cli import build_parser, config_file_error, main, take_process_options
from vlzoo.cli_help import CLIError, closest, condense, help_listed_options

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "zoo_configs/models/clip/shapes-tiny.yaml"
HEAVY = ("torch", "lightning", "transformers", "open_clip")
COMMANDS = ("fit", "validate", "test", "predict", "data", "capfilt", "compare", "list", "download", "export",
            "caption", "vqa", "retrieve", "zeroshot", "embed", "finetune", "eval")


def _heavy_modules_after(code: str) -> tuple[list[str], str]:
    """Run ``code`` in a fresh interpreter; the heavy modules it left imported, and its stdout."""
    probe = f"{code}\nimport sys, json\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    return json.loads(lines[-1]), "\n".join(lines[:-1])


@pytest.mark.parametrize("argv", [["--help"], ["list"], *[[c, "--help"] for c in COMMANDS]],
                         ids=lambda a: " ".join(a))
def test_help_and_list_import_nothing_heavy(argv):
    code = (f"import contextlib, io\nfrom vlzoo.cli import main\nbuf = io.StringIO()\n"
            f"with contextlib.redirect_stdout(buf):\n"
            f"    try:\n        main({argv!r})\n    except SystemExit:\n        pass\n"
            f"assert buf.getvalue(), 'printed nothing'")
    heavy, _ = _heavy_modules_after(code)
    assert heavy == [], f"vlzoo {' '.join(argv)} imported {heavy}"


def test_list_models_from_python_imports_nothing_heavy():
    heavy, out = _heavy_modules_after("import vlzoo\nprint(len(vlzoo.list_models()))")
    assert heavy == [] and int(out) > 10


def test_the_registry_answers_without_importing_torch():
    heavy, out = _heavy_modules_after(
        "from vlzoo import families\nprint(','.join(families.names()), families.get('blip').hf_model_type)")
    assert heavy == [] and out == "clip,albef,blip,blip_vqa,blip2,blip2_llm blip"


def _all_parsers(parser):
    yield parser
    for action in parser._actions:
        if isinstance(action.choices, dict):  # subcommands
            for sub in action.choices.values():
                yield from _all_parsers(sub)


def test_help_examples_are_printed_verbatim_at_any_width(monkeypatch):
    monkeypatch.setenv("COLUMNS", "50")
    checked = 0
    for parser in _all_parsers(build_parser()):
        epilog = parser.epilog or ""
        if not epilog.startswith("example"):
            continue
        text = parser.format_help()
        for line in epilog.splitlines()[1:]:
            assert line in text.splitlines(), f"{parser.prog}: example re-wrapped: {line}"
            checked += 1
    assert checked >= 15


def test_lightning_command_help_is_short_and_names_real_options(capsys):
    assert main(["fit", "--help"]) == 0
    text = capsys.readouterr().out
    assert 20 < len(text.splitlines()) < 60 and "vlzoo fit --help-all" in text
    full = subprocess.run([sys.executable, "-m", "vlzoo.cli", "fit", "--help-all"], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert full.returncode == 0, full.stderr[-2000:]
    from jsonargparse import ArgumentParser

    from vlzoo.tasks import CLIPTask

    model = ArgumentParser()
    model.add_class_arguments(CLIPTask, "model.init_args", fail_untyped=False)
    model_options = {o for a in model._actions for o in a.option_strings}
    for option in help_listed_options():
        assert option in full.stdout or option in model_options, \
            f"the short help names {option}, which vlzoo fit does not have"


def test_process_options_are_taken_anywhere():
    argv, debug, threads = take_process_options(["fit", "--threads", "1", "--config", "x.yaml", "--debug"])
    assert argv == ["fit", "--config", "x.yaml"] and debug and threads == "1"
    assert take_process_options(["--threads=auto", "list"])[2] == "auto"
    with pytest.raises(CLIError, match="--threads needs a value"):
        take_process_options(["fit", "--threads"])


def test_a_bad_thread_count_is_a_one_line_error(capsys):
    assert main(["--threads", "many", "data", "export", "shapes", "--out", "x"]) == 2
    err = capsys.readouterr().err
    assert "--threads: expected a positive number of threads or 'auto', got 'many'" in err


def test_a_mistyped_config_path_suggests_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    message = config_file_error(["--config", "zoo_configs/models/clip/shapes-tinyy.yaml"])
    assert message == ("--config: no such file zoo_configs/models/clip/shapes-tinyy.yaml; "
                       "did you mean zoo_configs/models/clip/shapes-tiny.yaml?")
    assert config_file_error(["--config", str(CONFIG)]) is None


def test_condense_keeps_the_useful_line_of_jsonargparse_errors():
    options = ["--trainer.max_steps", "--data.batch_size", "--model.init_args.model.embed_dim"]
    assert condense("unrecognized arguments: --trainer.max_stepz 3", options) == \
        "unknown option --trainer.max_stepz; did you mean --trainer.max_steps?"
    nested = ("Parser key \"model\":\n  Does not validate against any of the Union subtypes\n  Subtypes: [x]\n"
              "  Errors:\n    - Problem with given class_path 'vlzoo.tasks.CLIPTask':\n"
              "        unrecognized arguments: --model.embed_dimm=3\n    - Expected a <class 'NoneType'>\n"
              "  Given value type: <class 'jsonargparse._util.NestedArg'>\n  Given value: NestedArg(...)")
    assert condense(nested, options) == \
        "unknown option --model.init_args.model.embed_dimm; did you mean --model.init_args.model.embed_dim?"
    typed = ("Parser key \"model\":\n  Errors:\n    - Problem with given class_path 'vlzoo.tasks.CLIPTask':\n"
             "        Parser key \"optim.lr\":\n          Expected a <class 'float'>. Got value: x")
    assert condense(typed) == "--model.init_args.optim.lr: expected float, got 'x'"
    literal = ("Parser key \"trainer.precision\":\n  Does not validate against any of the Union subtypes\n"
               "  Errors:\n    - Expected a typing.Literal[64, 32]\n    - Expected a typing.Literal['bf16-mixed']")
    assert condense(literal) == "--trainer.precision: expected one of 64, 32, bf16-mixed"
    assert closest("--zzz", options) is None


@pytest.mark.parametrize("extra, expected", [
    (["--trainer.max_stepz", "3"], "unknown option --trainer.max_stepz; did you mean --trainer.max_steps?"),
    (["--model.init_args.model.loss", "infonse"], "model.loss must be one of ('infonce', 'siglip'), got 'infonse'"),
    (["--model.init_args.optim.lr", "fast"], "--model.init_args.optim.lr: expected float, got 'fast'"),
], ids=["unknown option", "bad enum", "type error"])
def test_cli_mistakes_are_two_lines_and_exit_2(tmp_path, capsys, extra, expected):
    assert main(["fit", "--config", str(CONFIG), "--trainer.default_root_dir", str(tmp_path), *extra]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines == [f"vlzoo fit: error: {expected}",
                     "  (vlzoo fit --help lists the options; --debug shows the traceback)"], lines


def test_debug_raises_instead(tmp_path, monkeypatch):
    with pytest.raises(CLIError, match="did you mean --trainer.max_steps"):
        main(["fit", "--config", str(CONFIG), "--trainer.max_stepz", "3", "--debug"])
    monkeypatch.setenv("VLZOO_DEBUG", "1")
    with pytest.raises(CLIError, match="did you mean --trainer.max_steps"):
        main(["fit", "--config", str(CONFIG), "--trainer.max_stepz", "3"])


def test_a_mistake_on_the_command_line_exits_2_without_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "vlzoo.cli", "fit", "--config", str(tmp_path / "nothing.yaml")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={k: v for k, v in os.environ.items() if k != "VLZOO_DEBUG"})
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.splitlines()[0] == f"vlzoo fit: error: --config: no such file {tmp_path / 'nothing.yaml'}"


def test_config_files_are_checked_before_torch(tmp_path):
    broken, text = tmp_path / "broken.yaml", tmp_path / "text.yaml"
    broken.write_text("trainer: [a, b\n")
    text.write_text("hello world\n")
    assert config_file_error([]) == "--config FILE is required (e.g. --config zoo_configs/models/clip/shapes-tiny.yaml)"
    assert config_file_error(["--config", str(tmp_path)]) == f"--config {tmp_path}: is a folder; expected a YAML file"
    assert config_file_error([f"--config={broken}"]).startswith(f"--config {broken}: not valid YAML (line 2, column 1)")
    assert config_file_error(["--config", str(CONFIG), "--config", str(text)]) == \
        f"--config {text}: expected a mapping of sections (trainer:, model:, data:, ...), got str"


def test_a_misspelled_key_in_a_config_file_names_the_files():
    message = "Subcommand 'fit' does not accept option 'trainer.max_stepz'"
    assert condense(message, ["--trainer.max_steps"], ["a.yaml", "b.yaml"], ["fit", "--config", "a.yaml"]) == \
        ("unknown option --trainer.max_stepz (key trainer.max_stepz in --config a.yaml, b.yaml); "
         "did you mean --trainer.max_steps?")
    nested = "Parser key \"model\":\n  Group 'model' does not accept option 'embed_dimm'"
    assert condense(nested, ["--model.init_args.model.embed_dim"], ["a.yaml"], []).startswith(
        "unknown option --model.init_args.model.embed_dimm (key model.init_args.model.embed_dimm in --config a.yaml)")


def test_a_resumed_fit_keeps_the_rows_logged_before_its_checkpoint(tmp_path):
    import csv

    run = tmp_path / "run"
    common = ["fit", "--config", str(CONFIG), "--trainer.default_root_dir", str(run), "--trainer.log_every_n_steps", "2",
              "--trainer.val_check_interval", "4", "--data.batch_size", "8", "--data.shapes.train_size", "64",
              "--data.shapes.val_size", "8", "--data.shapes.test_size", "8", "--progress.mode", "off"]
    assert main([*common, "--trainer.max_steps", "4"]) == 0
    assert main([*common, "--trainer.max_steps", "8", "--ckpt_path", "last"]) == 0
    with (run / "metrics.csv").open(newline="") as f:
        steps = sorted({int(row["step"]) for row in csv.DictReader(f) if "train/loss" in row and row["train/loss"]})
    assert steps[0] < 4 <= steps[-1], steps  # rows from before the resume and after it
