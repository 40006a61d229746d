"""The numeric options of ``vlzoo fit`` / ``validate`` / ``test`` / ``predict`` and the
values they accept, checked in a fraction of a second before torch or Lightning is
imported (a bad ``--data.batch_size`` is refused at once, naming the option, instead of
after the model is built).

The same restricted types (jsonargparse's) annotate the data module and the checkpoint
callback, so LightningCLI's own parse refuses the same values.
"""

from __future__ import annotations

from pathlib import Path

from jsonargparse.typing import (
    ClosedUnitInterval,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    restricted_number_type,
)

MinusOneOrMore = restricted_number_type("MinusOneOrMore", int, (">=", -1))  # -1: unlimited / all

NUMERIC_OPTIONS: dict[str, tuple[type, str]] = {
    "data.batch_size": (PositiveInt, "a positive integer"),
    "data.eval_batch_size": (PositiveInt, "a positive integer"),
    "data.num_workers": (NonNegativeInt, "an integer >= 0"),
    "data.samples_per_epoch": (PositiveInt, "a positive integer or null"),
    "data.shuffle_buffer": (PositiveInt, "a positive integer"),
    "data.max_bad_fraction": (ClosedUnitInterval, "a number in [0, 1]"),
    "data.max_image_pixels": (PositiveInt, "a positive integer"),
    "data.shapes.image_size": (PositiveInt, "a positive integer"),
    "data.shapes.train_size": (PositiveInt, "a positive integer"),
    "data.shapes.val_size": (PositiveInt, "a positive integer"),
    "data.shapes.test_size": (PositiveInt, "a positive integer"),
    "data.shapes.seed": (NonNegativeInt, "an integer >= 0"),
    "trainer.max_steps": (MinusOneOrMore, "-1 (no limit) or an integer >= 0"),
    "trainer.max_epochs": (MinusOneOrMore, "-1 (no limit), an integer >= 0 or null"),
    "trainer.min_steps": (NonNegativeInt, "an integer >= 0 or null"),
    "trainer.accumulate_grad_batches": (PositiveInt, "a positive integer"),
    "trainer.check_val_every_n_epoch": (PositiveInt, "a positive integer or null"),
    "trainer.log_every_n_steps": (PositiveInt, "a positive integer"),
    "trainer.num_sanity_val_steps": (MinusOneOrMore, "-1 (all) or an integer >= 0"),
    "trainer.num_nodes": (PositiveInt, "a positive integer"),
    "trainer.gradient_clip_val": (NonNegativeFloat, "a number >= 0 or null"),
    "trainer.val_check_interval": (PositiveFloat, "a positive number (a fraction of an epoch, or batches)"),
    "checkpoint.every_n_steps": (PositiveInt, "a positive integer or null"),
    "checkpoint.every_minutes": (PositiveFloat, "a positive number of minutes or null"),
    "checkpoint.save_top_k": (MinusOneOrMore, "-1 (all) or an integer >= 0"),
    "progress.every_seconds": (PositiveFloat, "a positive number of seconds"),
    "seed_everything": (NonNegativeInt, "an integer >= 0, true or false"),
}


def option_problem(option: str, value: object) -> str | None:
    """What is wrong with ``value`` for the numeric ``option`` (None: accepted, not a
    numeric option, or null)."""
    spec = NUMERIC_OPTIONS.get(option)
    if spec is None or value is None or isinstance(value, str) and value.lower() in ("null", "none"):
        return None
    if option == "seed_everything" and isinstance(value, bool):
        return None
    kind, accepted = spec
    try:
        kind(value)
    except (ValueError, TypeError):
        return f"{value!r} is not valid: expected {accepted}"
    return None


def check_options(**values: object) -> None:
    """For Python callers (the CLI's parser refuses the same by type): a ValueError
    naming the first option whose value is refused; ``values`` keyed by option name
    with ``__`` for dots (``data__batch_size``)."""
    for key, value in values.items():
        option = key.replace("__", ".")
        problem = option_problem(option, value)
        if problem:
            raise ValueError(f"{option}: {problem}")


def numeric_option_error(argv: list[str]) -> str | None:
    """The first bad numeric option of a Lightning command line (``--config FILE``
    sections and ``--key value`` / ``--key=value`` overrides), as a one-line message
    naming the option, where it came from and what is accepted; None when all are good
    or unknown (the full parse judges everything else). Like the parser, a bad value
    is refused even when a later one would override it."""
    for option, value, origin in _given_values(argv):
        problem = option_problem(option, value)
        if problem:
            value_text, _, rest = problem.partition(" is not valid")
            return f"--{option}: {value_text} ({origin}) is not valid{rest}"
    return None


def _given_values(argv: list[str]):
    """(option, value, origin) for every value of ``argv`` in the order the parser applies them."""
    import yaml

    i = 0
    while i < len(argv):
        arg = argv[i]
        key, has_value, inline = arg.partition("=")
        if not key.startswith("--"):
            i += 1
            continue
        value = inline if has_value else (argv[i + 1] if i + 1 < len(argv) else None)
        i += 1 if has_value else 2
        if key == "--config" and value is not None:
            yield from _config_values(Path(value))
        elif value is not None:
            try:
                parsed = yaml.safe_load(value)
            except yaml.YAMLError:
                parsed = value
            yield key[2:], parsed, "command line"


def _config_values(path: Path):
    import yaml

    try:
        tree = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return  # the full parse reports a missing or broken config
    for option, value in _flatten(tree):
        yield option, value, str(path)


def _flatten(tree, prefix: str = ""):
    if not isinstance(tree, dict):
        return
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _flatten(value, f"{name}.")
        else:
            yield name, value
