"""What the ``vlzoo`` command says: help that prints examples verbatim, the short help
of the Lightning commands (printed without importing torch or Lightning), and CLI
errors condensed to one or two lines that name the option and suggest the closest one.

Imports nothing heavy: ``vlzoo --help`` and every ``vlzoo COMMAND --help`` run from here.
"""

from __future__ import annotations

import argparse
import difflib
import re
from pathlib import Path

EXAMPLE_HEADER = "example"


def examples(*commands: str) -> str:
    """An epilog of example commands, printed verbatim (one per line, never re-wrapped)."""
    title = "example:" if len(commands) == 1 else "examples:"
    return "\n".join([title, *(f"  {command}" for command in commands)])


class ExampleFormatter(argparse.HelpFormatter):
    """Wraps descriptions as usual but prints an ``example:`` epilog verbatim, so a long
    path is never broken in the middle and every example pastes."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith(EXAMPLE_HEADER):
            return "\n".join(indent + line for line in text.splitlines())
        return super()._fill_text(text, width, indent)


class VLZooArgumentParser(argparse.ArgumentParser):
    """``argparse`` with :class:`ExampleFormatter`; subcommand parsers inherit it."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", ExampleFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # one line and where to look, not the whole usage
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ------------------------------------------------------------------ Lightning commands
COMMON_OPTIONS = (
    ("--config FILE", "a YAML config (zoo_configs/models/...); repeatable, later files win"),
    ("--trainer.max_steps N", "optimizer steps to train"),
    ("--trainer.default_root_dir DIR", "the run directory: checkpoints, metrics.json, loss.png, config.yaml"),
    ("--trainer.accelerator NAME", "cpu, gpu or auto"),
    ("--trainer.devices N", "devices (processes) to train on"),
    ("--trainer.precision P", "32-true, bf16-mixed, 16-mixed"),
    ("--trainer.val_check_interval N", "validate every N training batches"),
    ("--trainer.strategy NAME", "auto, ddp, fsdp, ..."),
    ("--data.batch_size N", "batch size per device"),
    ("--data.num_workers N", "data loading worker processes"),
    ("--data.train SOURCE", "training data: JSONL, CSV, Karpathy JSON, shards, a folder, hf:NAME"),
    ("--data.val SOURCE", "validation data (same kinds)"),
    ("--data.test SOURCE", "test data (same kinds)"),
    ("--model.init_args.optim.lr X", "peak learning rate"),
    ("--checkpoint.every_n_steps N", "also write last.ckpt every N steps"),
    ("--checkpoint.every_minutes M", "also write last.ckpt every M minutes (default 10)"),
    ("--progress.every_seconds S", "with output to a file or pipe: one progress line every S seconds (30)"),
    ("--ckpt_path PATH", "fit: resume (last = the run's newest checkpoint); others: the weights to evaluate"),
    ("--seed_everything N", "the seed (default 0)"),
    ("--print_config", "print the effective configuration and exit"),
)
PROCESS_OPTIONS = (
    ("--threads N", "CPU threads (default: adaptive to the cores other processes leave free; VLZOO_THREADS)"),
    ("--debug", "full tracebacks for errors (VLZOO_DEBUG=1)"),
)
COMMAND_EXAMPLES = {
    "fit": ("vlzoo fit --config zoo_configs/models/clip/shapes-tiny.yaml",
            "vlzoo fit --config zoo_configs/models/clip/shapes-tiny.yaml --trainer.max_steps 200 --data.batch_size 64",
            "vlzoo fit --config zoo_configs/models/clip/shapes-tiny.yaml --ckpt_path last"),
    "validate": ("vlzoo validate --config zoo_configs/models/clip/shapes-tiny.yaml "
                 "--ckpt_path runs/clip-shapes-tiny/checkpoints/last.ckpt",),
    "test": ("vlzoo test --config zoo_configs/models/clip/shapes-tiny.yaml "
             "--ckpt_path runs/clip-shapes-tiny/checkpoints/last.ckpt",),
    "predict": ("vlzoo predict --config zoo_configs/models/clip/shapes-tiny.yaml "
                "--ckpt_path runs/clip-shapes-tiny/checkpoints/last.ckpt",),
}


def lightning_help(command: str, summary: str) -> str:
    """The short help of ``vlzoo fit`` / ``validate`` / ``test`` / ``predict``: the options
    people use, the way to every other one, and examples (no torch or Lightning import)."""
    width = max(len(name) for name, _ in COMMON_OPTIONS + PROCESS_OPTIONS) + 2
    lines = [f"usage: vlzoo {command} --config FILE [--config FILE ...] [--KEY VALUE ...]", "",
             f"{summary[0].upper()}{summary[1:]}. Every key of the YAML configs can be set with a dotted",
             "option (--section.key value); later options and files win.", "", "common options:"]
    lines += [f"  {name:<{width}}{text}" for name, text in COMMON_OPTIONS]
    lines += ["", "process options (any vlzoo command):"]
    lines += [f"  {name:<{width}}{text}" for name, text in PROCESS_OPTIONS]
    lines += ["", "every option (long; imports torch and Lightning):", f"  vlzoo {command} --help-all",
              "a model's options:", f"  vlzoo {command} --model.help vlzoo.tasks.CLIPTask", "",
              examples(*COMMAND_EXAMPLES[command])]
    return "\n".join(lines) + "\n"


def help_listed_options() -> list[str]:
    """The dotted options the short help names (a test checks each exists)."""
    return [name.split()[0] for name, _ in COMMON_OPTIONS]


# ------------------------------------------------------------------ errors
class CLIError(Exception):
    """A mistake on the command line or in a config: printed as its message alone."""


_NOISE = (
    "Does not validate against any of the Union subtypes", "Subtypes:", "Errors:",
    "Expected a <class 'NoneType'>", "Given value type:", "Given value:",
)
_PARSER_KEY = re.compile(r'Parser key "([^"]+)":\s*(.*)')
_CLASS_PATH = re.compile(r"Problem with given class_path '[^']*':")
_UNRECOGNIZED = re.compile(r"unrecognized arguments: (.*)")
_EXPECTED = re.compile(r"Expected a <class '(\w+)'>\. Got value: (.*)")
_LITERAL = re.compile(r"Expected a typing\.Literal\[(.*)\]")
_NO_FILE = re.compile(r"File does not exist: '?([^']+)'?")
_NOT_ACCEPTED = re.compile(r"(?:Subcommand '\w+'|Group '([\w.]+)') does not accept option '([\w.]+)'")


def closest(word: str, candidates: list[str]) -> str | None:
    """The candidate most like ``word`` (None when none is close)."""
    found = difflib.get_close_matches(word, candidates, n=1, cutoff=0.75)
    return found[0] if found else None


def similar_file(path: str) -> str | None:
    """The YAML file most like ``path`` under its nearest existing folder."""
    missing = Path(path)
    folder = missing.parent
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    try:
        names = [str(p) for p in folder.rglob("*.y*ml")][:2000]
    except OSError:
        return None
    found = closest(str(missing), names)
    return None if found is None else (str(Path(found).relative_to(Path.cwd())) if Path(found).is_relative_to(
        Path.cwd()) else found)


def _unknown_options(text: str, prefix: str, options: list[str], files: list[str], argv: list[str]) -> str:
    given = [w.split("=", 1)[0] for w in text.split() if w.startswith("--")] or [text.strip()]
    parts = []
    for option in given:
        full = option if not prefix else "--" + prefix + option[2:]
        parts.append(_unknown(full, options, files, argv))
    return "; ".join(parts)


def _unknown(full: str, options: list[str], files: list[str], argv: list[str]) -> str:
    """``unknown option --X`` (in which files, when not on the command line) and the closest valid one."""
    guess = closest(full, options)
    on_command_line = any(a.split("=", 1)[0].lstrip("-").endswith(full.lstrip("-").rsplit(".", 1)[-1]) for a in argv
                          if a.startswith("--"))
    where = "" if on_command_line or not files else f" (key {full[2:]} in --config {', '.join(files)})"
    return f"unknown option {full}{where}" + (f"; did you mean {guess}?" if guess else "")


def condense(message: str, options: list[str] | None = None, files: list[str] = (), argv: list[str] = ()) -> str:
    """The useful line(s) of a jsonargparse / config error: which option or file, what
    was wrong, and the closest valid option. ``options``: every valid ``--dotted.option``;
    ``files``: the ``--config`` files (named when a key came from one); ``argv``: the
    command line."""
    options, files, argv = options or [], list(files), list(argv)
    keys: list[str] = []
    in_class = False
    details: list[str] = []
    allowed: dict[str, list[str]] = {}
    for raw in message.splitlines():
        line = raw.strip().lstrip("- ").strip()
        if not line or any(line.startswith(n) for n in _NOISE):
            continue
        if _CLASS_PATH.match(line):
            in_class = True
            continue
        key = _PARSER_KEY.match(line)
        if key:
            name = key.group(1)
            keys.append(f"{keys[-1]}.init_args.{name}" if keys and in_class else name)
            line = key.group(2).strip()
            if not line:
                continue
        prefix = f"{keys[-1]}.init_args." if keys and in_class else ""
        unrecognized = _UNRECOGNIZED.search(line)
        if unrecognized:
            details.append(_unknown_options(unrecognized.group(1), prefix, options, files, argv))
            continue
        refused = _NOT_ACCEPTED.search(line)
        if refused:
            group, option = refused.groups()
            inner = f"{group}.{option}" if group else option
            outer = f"{keys[-1]}.init_args." if keys else ""
            details.append(_unknown(f"--{outer}{inner}", options, files, argv))
            continue
        where = f"--{keys[-1]}: " if keys else ""
        literal = _LITERAL.match(line)
        if literal:
            values = [v.strip().strip("'") for v in literal.group(1).split(",")]
            allowed.setdefault(where, []).extend(v for v in values if v not in allowed.get(where, []))
            continue
        expected = _EXPECTED.match(line)
        if expected:
            details.append(f"{where}expected {expected.group(1)}, got {expected.group(2)!r}")
            continue
        no_file = _NO_FILE.search(line)
        if no_file:
            similar = similar_file(no_file.group(1))
            details.append(f"{where}no such file {no_file.group(1)}" + (f"; did you mean {similar}?" if similar else ""))
            continue
        details.append(f"{where}{line}" if where and not line.startswith(where[2:-2]) else line)
    details += [f"{where}expected one of {', '.join(values)}" for where, values in allowed.items()]
    return "; ".join(dict.fromkeys(details)) or message.strip().splitlines()[0]
