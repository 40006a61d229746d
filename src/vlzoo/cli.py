"""The ``vlzoo`` command: LightningCLI for fit/validate/test/predict, plus utilities.

:func:`main` is the one entry point of every command (``vlzoo``, ``python -m vlzoo.cli``,
the runs ``vlzoo compare`` starts): it takes the process options (``--threads``,
``--debug``), sets the CPU thread policy and quiets known noise before torch is imported,
and turns command-line mistakes into one-line errors.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from vlzoo.cli_help import CLIError, VLZooArgumentParser, condense, examples, lightning_help
from vlzoo.options import numeric_option_error

LIGHTNING_COMMANDS = {
    "fit": "train a model from a YAML config, then test its best checkpoint",
    "validate": "evaluate a model on the validation split",
    "test": "evaluate a model on the test split",
    "predict": "embed the test images with a model",
}


def _lightning_cli(args: list[str] | None, run: bool = True):
    """Run a Lightning command (``args`` starts with fit/validate/test/predict), or with
    ``run`` False build its model, data module and trainer from ``args`` (no subcommand)
    and return the CLI object holding them."""
    from jsonargparse import ArgumentError
    from lightning.pytorch.cli import LightningCLI

    from vlzoo import families
    from vlzoo.callbacks import Preemption
    from vlzoo.data.datamodule import VLDataModule
    from vlzoo.process import quiet_lightning_logs
    from vlzoo.progress import StepProgress, ThreadPolicy
    from vlzoo.tasks.base import VLTask

    quiet_lightning_logs()
    Preemption.user_interrupted = False
    families.load_plugins()  # their tasks and configs are known before any checkpoint is read

    class VLZooCLI(LightningCLI):
        """LightningCLI with checkpoints that keep up (``--checkpoint.*``), a checked
        ``--ckpt_path``, default loggers in the run directory and a run summary."""

        def add_arguments_to_parser(self, parser) -> None:
            from vlzoo.callbacks import RunCheckpoint

            parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
            parser.add_lightning_class_args(StepProgress, "progress")
            link_model_inputs(parser)

        def parse_arguments(self, parser, args) -> None:
            try:
                super().parse_arguments(parser, args)
            except ArgumentError as err:
                argv = list(sys.argv[1:] if args is None else args)
                raise CLIError(condense(str(err), valid_options(self, args), config_files(argv), argv)) from err
            try:  # before LightningCLI reads the checkpoint's hyper-parameters
                check_ckpt_path(self.config)
            except (ValueError, FileNotFoundError) as err:
                raise CLIError(str(err)) from err

        def instantiate_classes(self) -> None:
            announce_thread_policy()  # the options parsed: the work starts
            try:
                super().instantiate_classes()
            except (ArgumentError, ValueError, TypeError, FileNotFoundError) as err:
                raise CLIError(condense(str(err))) from err

        def instantiate_trainer(self, **kwargs: Any):
            section = self.config_init[self.subcommand] if self.subcommand else self.config_init  # run=False: flat
            trainer_cfg = section["trainer"]
            if trainer_cfg.get("logger") in (None, True):
                ckpt = section.get("ckpt_path") if self.subcommand == "fit" else None
                trainer_cfg["logger"] = default_loggers(trainer_cfg.get("default_root_dir") or ".", ckpt)
            if trainer_cfg.get("enable_progress_bar") is False:  # the progress callback is vlzoo's: keep it, silent
                trainer_cfg["enable_progress_bar"] = True
                section["progress"].disable()
            return super().instantiate_trainer(**kwargs)

        def _resolve_init_from(self) -> bool:
            """The explicit step that reads ``finetune.init_from`` (any model reference) and
            hands it to the task; whether the task has one."""
            finetune = getattr(self.model, "finetune", None)
            if finetune is None or not finetune.init_from:
                return False
            from vlzoo.hub.loaders import load_parts_once

            self.model.use_initial_weights(load_parts_once(finetune.init_from))
            return True

        def before_fit(self) -> None:
            config = self.config_init[self.subcommand]
            finetune = getattr(self.model, "finetune", None)
            if finetune is not None and finetune.init_from and config["ckpt_path"] is not None:
                self.model.skip_initial_weights()  # resumed: the run's own checkpoint has the weights
            elif self._resolve_init_from():
                evaluate_start(self.trainer, self.model, self.datamodule)

        def before_validate(self) -> None:
            self._resolve_init_from()

        def before_test(self) -> None:
            self._resolve_init_from()

        def before_predict(self) -> None:
            self._resolve_init_from()

        def after_fit(self) -> None:
            trainer = self.trainer
            summary = {"train/loss": _metric(trainer.callback_metrics.get("train/loss"))}
            summary.update(_stage_metrics(trainer.callback_metrics, "val/"))
            summary.update(run_stats(trainer, self.model))  # before test: testing attaches fresh callbacks
            best = getattr(trainer.checkpoint_callback, "best_model_path", "") or None
            trainer.test(self.model, datamodule=self.datamodule, ckpt_path="best" if best else None)
            summary.update(_stage_metrics(trainer.callback_metrics, "test/"))
            summary["best_checkpoint"] = best
            write_run_summary(trainer, summary)

        def after_test(self) -> None:
            write_run_summary(self.trainer, _stage_metrics(self.trainer.callback_metrics, "test/"))

        def after_validate(self) -> None:
            write_run_summary(self.trainer, _stage_metrics(self.trainer.callback_metrics, "val/"))

    try:
        return VLZooCLI(
            model_class=VLTask,
            subclass_mode_model=True,
            datamodule_class=VLDataModule,
            parser_kwargs={"parser_mode": "omegaconf+", "exit_on_error": False, "allow_abbrev": False},
            save_config_kwargs={"overwrite": True},
            trainer_defaults={"callbacks": [ThreadPolicy()]},
            seed_everything_default=0,
            args=args,
            run=run,
        )
    except SystemExit:  # SIGTERMException, or Lightning's exit(1) after a KeyboardInterrupt
        if Preemption.user_interrupted:  # Ctrl-C: exit as an interrupted command (what was saved is printed)
            raise KeyboardInterrupt from None
        raise


def build_lightning_run(args: list[str]):
    """The model, data module and trainer that ``vlzoo fit ARGS`` would use, built but not
    run (``args``: the options, without the subcommand); ``.model``, ``.datamodule`` and
    ``.trainer`` of the returned object hold them."""
    import warnings

    with warnings.catch_warnings():  # the calling command's own argv is not meant for this run
        warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python")
        return _lightning_cli(args, run=False)


def valid_options(cli, args: list[str] | None) -> list[str]:
    """Every ``--option`` of the command being parsed, with the init arguments of every
    registered task under ``--model.init_args.`` (for "did you mean" suggestions)."""
    from jsonargparse import ArgumentParser

    from vlzoo import families

    argv = list(sys.argv[1:] if args is None else args)
    parser = getattr(cli, "_subcommand_parsers", {}).get(argv[0]) if argv else None
    names = [o for a in (parser._actions if parser is not None else []) for o in a.option_strings]
    for task in dict.fromkeys(families.task_classes().values()):
        model = ArgumentParser(exit_on_error=False)
        try:
            model.add_class_arguments(task, "model.init_args", fail_untyped=False)
        except Exception:  # noqa: BLE001 - suggestions only: a task jsonargparse cannot read gives none
            continue
        names += [o for a in model._actions for o in a.option_strings]
    return sorted({n for n in names if n.startswith("--") and n not in ("--help", "-h")})


def link_model_inputs(parser) -> None:
    """``data.inputs`` (tokenizer, image preprocessing, extra fields) from the instantiated
    model: the model's knobs set what the data module feeds it, and are no data options."""
    from vlzoo.data.datamodule import ModelInputs

    parser.link_arguments("model", "data.inputs", compute_fn=ModelInputs.of, apply_on="instantiate")


def check_ckpt_path(config) -> None:
    """``--ckpt_path`` made safe before anything reads it: for ``fit``, the newest
    complete checkpoint (``last``, or the given path, else the newest complete one beside
    it; corrupt ones are moved aside as ``*.corrupt``); for the other commands, the given
    checkpoint must be complete. Its task must be one of vlzoo's (nothing it names is
    imported). Sets the resolved path in ``config``."""
    from vlzoo.checkpoints import checkpoint_problem, read_checkpoint, resolve_resume
    from vlzoo.families import task_class

    command = config.get("subcommand")
    section = config.get(command) if command else None
    given = section.get("ckpt_path") if section is not None else None
    if given is None or given in ("best", "hpc", "registry") or (given == "last" and command != "fit"):
        return
    if command == "fit":
        root = section.get("trainer", {}).get("default_root_dir") or "."
        path = resolve_resume(given, Path(root) / "checkpoints")
    else:
        problem = checkpoint_problem(given)
        if problem is not None:
            raise ValueError(f"--ckpt_path {given}: {problem}")
        path = given
    section["ckpt_path"] = path
    if path is not None and Path(path).is_file():
        checkpoint = read_checkpoint(path, mmap=True)
        task_class(checkpoint, path)
        if command == "fit":
            print(f"vlzoo: resuming from {path} (step {checkpoint.get('global_step')})", flush=True)


def evaluate_start(trainer, model, datamodule) -> None:
    """Test the starting weights of a fine-tuning run (``finetune.init_from``) and record
    them as ``start/test/...`` in ``ROOT/metrics.json``: the figures fine-tuning must beat."""
    print(f"vlzoo: testing the starting model {model.finetune.init_from} before fine-tuning", flush=True)
    trainer.test(model, datamodule=datamodule, verbose=False)
    start = {f"start/{k}": v for k, v in _stage_metrics(trainer.callback_metrics, "test/").items()}
    write_run_summary(trainer, start)
    print("vlzoo: start: " + ", ".join(f"{k} {v:.4f}" for k, v in start.items()), flush=True)


def default_loggers(root: str, resume_from: str | None = None) -> list:
    """A CSV logger writing ``ROOT/metrics.csv`` (and TensorBoard when installed). A
    resumed fit keeps the rows logged before its checkpoint's step (Lightning's CSV
    logger would start the file anew)."""
    from lightning.pytorch.loggers import CSVLogger

    csv_logger = CSVLogger(save_dir=root, name="", version="")
    if resume_from is not None and Path(resume_from).is_file() and (Path(root) / "metrics.csv").is_file():
        keep_logged_history(csv_logger, Path(root) / "metrics.csv", resume_from)
    loggers = [csv_logger]
    try:
        from lightning.pytorch.loggers import TensorBoardLogger
        from lightning.pytorch.loggers.tensorboard import _TENSORBOARD_AVAILABLE

        if _TENSORBOARD_AVAILABLE:
            loggers.append(TensorBoardLogger(save_dir=root, name="tensorboard", version=""))
    except ImportError:
        pass
    return loggers


def keep_logged_history(csv_logger, metrics_csv: Path, checkpoint: str) -> None:
    """Carry the rows of ``metrics_csv`` logged before ``checkpoint``'s step into the
    logger's first save (rows from later steps are logged again by the resumed run)."""
    import csv
    import warnings

    from vlzoo.checkpoints import read_checkpoint

    step = int(read_checkpoint(checkpoint, mmap=True).get("global_step", 0))
    with metrics_csv.open(newline="") as f:
        rows = [{k: v for k, v in row.items() if v != ""} for row in csv.DictReader(f)]
    earlier = [row for row in rows if row.get("step", "").isdigit() and int(row["step"]) < step]
    with warnings.catch_warnings():  # "will be deleted": these rows are written back below
        warnings.simplefilter("ignore")
        writer = csv_logger.experiment
    if writer is not None and hasattr(writer, "metrics"):
        writer.metrics[:0] = earlier


def run_stats(trainer, module) -> dict[str, float]:
    """Throughput, parameter counts and peak memory of a fit (``RunStats``) and the
    skipped-sample counts (``SkippedSamples``), where attached."""
    from vlzoo.callbacks import RunStats, SkippedSamples

    summary: dict[str, float] = {}
    for callback in trainer.callbacks:
        if isinstance(callback, RunStats):
            summary.update(callback.summary(trainer, module))
        if isinstance(callback, SkippedSamples):
            summary.update(callback.counts())
    return summary


def _metric(value) -> float | None:
    return None if value is None else float(value)


def _stage_metrics(metrics: dict, prefix: str) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if k.startswith(prefix)}


def write_run_summary(trainer, metrics: dict[str, Any]) -> None:
    """Merge ``metrics`` into ``ROOT/metrics.json`` and redraw ``ROOT/loss.png`` (rank 0)."""
    if not trainer.is_global_zero:
        return
    from vlzoo.plots import plot_loss_curves
    from vlzoo.utils import atomic_write_json

    root = Path(trainer.default_root_dir)
    path = root / "metrics.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    atomic_write_json(path, {**previous, **metrics})
    csv_log = root / "metrics.csv"
    if csv_log.exists():
        plot_loss_curves(csv_log, root / "loss.png", title=str(root))
    print(f"vlzoo: wrote {path}" + (f" and {root / 'loss.png'}" if csv_log.exists() else ""))


def _export(args: argparse.Namespace) -> None:
    from vlzoo.data import shapes

    size = args.limit if args.size is None else args.size
    split = shapes.load_split(args.split, size, args.image_size, args.seed)
    out = shapes.export_split(split, args.out, args.limit)
    print(f"wrote {min(args.limit, len(split))} images and {out}")


def _capfilt(args: argparse.Namespace) -> None:
    import torch

    from vlzoo.capfilt import run_capfilt
    from vlzoo.families import load_task
    from vlzoo.models.generation import GenerationConfig

    source = args.data
    if source.startswith("shapes"):
        from vlzoo.data import shapes

        split_name = source.partition(":")[2] or "train"
        split = shapes.load_split(split_name, args.limit, 64, args.seed)
        source = shapes.export_split(split, Path(args.out) / "source", args.limit)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    captioner = load_task(args.captioner, map_location=device)
    filt = captioner if args.filter == args.captioner else load_task(args.filter, map_location=device)
    for name, task in (("--captioner", captioner), ("--filter", filt)):
        if not hasattr(task.model, "itm_logits") or (name == "--captioner" and not hasattr(task, "caption")):
            raise SystemExit(f"vlzoo capfilt: {name} {getattr(args, name[2:])} is not a BLIP checkpoint")
    torch.manual_seed(args.seed)
    generation = GenerationConfig(method="nucleus", top_p=args.top_p, max_length=args.max_length, min_length=1)
    report = run_capfilt(captioner, filt, source, args.out, args.threshold, args.synthetic, args.batch_size,
                         generation)
    web = report.web_kept + report.web_removed
    synthetic = report.synthetic_kept + report.synthetic_removed
    print(f"capfilt: {report.images} images; kept {report.web_kept}/{web} web and "
          f"{report.synthetic_kept}/{synthetic} synthetic captions; skipped {len(report.skipped)} images")
    print(f"wrote {Path(args.out) / 'captions.jsonl'} and {Path(args.out) / 'capfilt_report.json'}")


def _list(args: argparse.Namespace) -> None:
    from vlzoo.hub.manifest import list_models, load_manifest

    entries = load_manifest()
    names = list_models(args.filter)
    if args.json:
        print(json.dumps([{"name": n, "family": entries[n].family, "source": entries[n].source_description,
                           "metric": entries[n].metric} for n in names], indent=2))
        return
    width = max((len(n) for n in names), default=4)
    for n in names:
        e = entries[n]
        m = e.metric
        run = f" ({m['record']['steps']} steps x {m['record']['batch_size']}, {m['measured']})" if "record" in m else ""
        print(f"{n:<{width}}  {e.family:<9}  {m['dataset']} {m['name']} {m['value']}{run}")
    print(f"{len(names)} checkpoints (details: vlzoo list --json)")


def _download(args: argparse.Namespace) -> None:
    from vlzoo.hub.download import fetch, fetch_hf_repo, fetch_tokenizer
    from vlzoo.hub.manifest import get_entry

    for name in args.names:
        if name.startswith("hf://"):
            path = fetch_hf_repo(name.removeprefix("hf://"))
        else:
            entry = get_entry(name)
            path = fetch(entry.name, entry.source, entry.sha256)
            tokenizer = fetch_tokenizer(entry.tokenizer)  # a tokenizer the config names (ALBEF: bert-base-uncased)
            if tokenizer is not None:
                print(f"{name}: tokenizer {entry.tokenizer}: {tokenizer}")
        print(f"{name}: {path}")


def _export_model(args: argparse.Namespace) -> None:
    from vlzoo.hub.export import export_parts, export_to_hf
    from vlzoo.hub.loaders import load_parts

    parts = load_parts(args.model)
    if args.head and args.to != "hf":
        raise SystemExit("vlzoo export: --head applies to --to hf")
    out = export_to_hf(parts, args.out, args.head) if args.to == "hf" else export_parts(parts, args.out)
    print(f"exported {args.model} ({parts.family}) to {out}")


def _compare(args: argparse.Namespace) -> None:
    from vlzoo.compare import compare

    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
    compare(args.recipe, args.out, build_lightning_run, models, seeds=args.seeds, budget=args.budget)
    print(f"wrote {Path(args.out) / 'results.json'}, results.md, curves.png and comparison.png")


def _add_zoo_commands(commands) -> None:
    comparing = commands.add_parser(
        "compare", help="train every family under one recipe and compare them on one test split",
        description="Each model gets the same budget (the recipe's: steps, samples, FLOPs or wall time), each seed "
                    "its own run. Re-run with the same --out to continue: finished runs are skipped and an "
                    "interrupted one resumes from its last checkpoint.",
        epilog=examples("vlzoo compare --recipe zoo_configs/recipes/shapes.yaml --out runs/compare",
                        "vlzoo compare --recipe zoo_configs/recipes/shapes.yaml --out runs/compare --models clip,blip2",
                        "vlzoo compare --recipe zoo_configs/recipes/shapes.yaml --out runs/compare3 --seeds 3",
                        "vlzoo compare --recipe zoo_configs/recipes/shapes.yaml --out runs/steps --budget steps=300"))
    comparing.add_argument("--recipe", required=True, help="recipe YAML (zoo_configs/recipes/)")
    comparing.add_argument("--models", default=None, help="comma-separated subset, e.g. clip,blip2")
    comparing.add_argument("--out", required=True, help="output directory")
    comparing.add_argument("--seeds", type=int, default=None,
                           help="runs per model, seeds SEED..SEED+N-1 (default: the recipe's seeds, else 1)")
    comparing.add_argument("--budget", default=None, metavar="KIND[=AMOUNT]",
                           help="steps, samples, flops or wall_time (seconds), per model; the amount defaults to "
                                "the recipe's (default: the recipe's budget.by)")
    comparing.set_defaults(run=_compare)
    listing = commands.add_parser("list", help="list the pretrained checkpoints of the manifest",
                                  epilog=examples("vlzoo list blip-"))
    listing.add_argument("filter", nargs="?", default=None, help="a substring or pattern (blip2-*)")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(run=_list)
    download = commands.add_parser("download", help="fetch checkpoints into the cache (sha256 verified)",
                                   epilog=examples("vlzoo download clip-vit-b32-openai blip-itm-base-coco"))
    download.add_argument("names", nargs="+", help="manifest names or hf://org/repo")
    download.set_defaults(run=_download)
    export = commands.add_parser("export", help="save a model as safetensors + config (or as a transformers model)",
                                 description="Then, in Python: vlzoo.load('blip-shapes').",
                                 epilog=examples("vlzoo export runs/blip-shapes-tiny --out blip-shapes"))
    export.add_argument("model", help="manifest name, checkpoint, run directory or model directory")
    export.add_argument("--out", required=True, help="output directory (replaced atomically)")
    export.add_argument("--to", choices=["vlzoo", "hf"], default="vlzoo",
                        help="vlzoo: model.safetensors + vlzoo_config.yaml; hf: a transformers directory "
                             "(BLIP and BLIP-2)")
    export.add_argument("--head", choices=["retrieval", "captioning"], default=None,
                        help="--to hf of a BLIP with both: which transformers class (default retrieval)")
    export.set_defaults(run=_export_model)


def build_parser() -> argparse.ArgumentParser:
    from vlzoo import __version__

    parser = VLZooArgumentParser(
        prog="vlzoo",
        description="A PyTorch Lightning model zoo for CLIP -> ALBEF -> BLIP -> BLIP-2. Process options, before "
                    "or after the command: --threads N (CPU threads; default adaptive, VLZOO_THREADS), --debug "
                    "(tracebacks; VLZOO_DEBUG=1).",
        epilog=examples("vlzoo fit --config zoo_configs/models/clip/shapes-tiny.yaml",
                        "vlzoo compare --recipe zoo_configs/recipes/shapes.yaml --out runs/compare",
                        "vlzoo list"),
    )
    parser.add_argument("--version", action="version", version=f"vlzoo {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, text in LIGHTNING_COMMANDS.items():
        commands.add_parser(name, help=f"{text} (vlzoo {name} --help)", add_help=False)
    data = commands.add_parser("data", help="embedded datasets")
    data_commands = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    export = data_commands.add_parser(
        "export", help="write images as PNG plus captions.jsonl",
        epilog=examples("vlzoo data export shapes --split test --limit 100 --out shapes_test"),
    )
    export.add_argument("name", choices=["shapes"])
    export.add_argument("--split", choices=["train", "val", "test"], default="test")
    export.add_argument("--limit", type=int, default=1000, help="number of images to write")
    export.add_argument("--size", type=int, default=None,
                        help="split size to generate (default: --limit; samples do not depend on it)")
    export.add_argument("--image-size", type=int, default=64)
    export.add_argument("--seed", type=int, default=0)
    export.add_argument("--out", required=True, help="output directory")
    export.set_defaults(run=_export)
    capfilt = commands.add_parser(
        "capfilt", help="caption and filter a noisy image-text set with BLIP checkpoints",
        epilog=examples("vlzoo capfilt --captioner runs/blip-shapes-tiny/checkpoints/last.ckpt "
                        "--filter runs/blip-shapes-tiny/checkpoints/last.ckpt --data noisy/captions.jsonl --out clean"),
    )
    capfilt.add_argument("--captioner", required=True, help="BLIP checkpoint that writes synthetic captions")
    capfilt.add_argument("--filter", required=True, help="BLIP checkpoint whose ITM head filters captions")
    capfilt.add_argument("--data", required=True,
                         help="any data source (JSONL, CSV, Karpathy JSON, shards, datasets folder, hf:NAME) "
                              "or shapes[:SPLIT] (exported under OUT/source)")
    capfilt.add_argument("--out", required=True, help="output directory")
    capfilt.add_argument("--threshold", type=float, default=0.5, help="minimum ITM match probability to keep")
    capfilt.add_argument("--synthetic", type=int, default=1, help="synthetic captions per image")
    capfilt.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling of synthetic captions")
    capfilt.add_argument("--max-length", type=int, default=30, help="tokens per synthetic caption at most")
    capfilt.add_argument("--batch-size", type=int, default=64)
    capfilt.add_argument("--limit", type=int, default=1000, help="images of a shapes source")
    capfilt.add_argument("--seed", type=int, default=0)
    capfilt.set_defaults(run=_capfilt)
    _add_zoo_commands(commands)
    from vlzoo.inference import add_inference_commands

    add_inference_commands(commands)
    from vlzoo.evaluate import add_eval_command

    add_eval_command(commands)
    finetune_parser(commands)
    return parser


def finetune_parser(commands=None) -> argparse.ArgumentParser:
    """``vlzoo finetune``: its own options; every other option goes to ``vlzoo fit``."""
    from vlzoo.families import FINETUNE_TASKS

    kwargs = dict(
        help="fine-tune a model for a task with a recipe from zoo_configs/tasks/",
        description="Fine-tune --model for --task with the task's recipe for the model's family "
                    "(zoo_configs/tasks/TASK/FAMILY.yaml). Any other option is a `vlzoo fit` override "
                    "(--trainer.max_steps 500, --data.train my.jsonl, --model.init_args.finetune.freeze [vision]). "
                    "The starting model is tested first (start/test/... in ROOT/metrics.json), then trained and "
                    "tested again; ROOT/start_model.yaml is the starting model's layer over the recipe, ROOT/config.yaml "
                    "records the whole run.",
        epilog=examples("vlzoo finetune --model runs/clip-shapes-tiny/checkpoints/last.ckpt --task classify "
                        "--recipe zoo_configs/tasks/classify/clip-shapes.yaml --out runs/clip-shapes-classify"))
    parser = commands.add_parser("finetune", **kwargs) if commands is not None else VLZooArgumentParser(
        prog="vlzoo finetune", **{k: v for k, v in kwargs.items() if k != "help"})
    parser.add_argument("--model", required=True, help="manifest name, vlzoo checkpoint, run or export directory")
    parser.add_argument("--task", required=True, choices=FINETUNE_TASKS)
    parser.add_argument("--recipe", default=None, help="recipe YAML (default: zoo_configs/tasks/TASK/FAMILY.yaml)")
    parser.add_argument("--out", default=None, help="run directory (default: the recipe's, or runs/finetune-TASK-FAMILY)")
    return parser


def _finetune(argv: list[str], from_command_line: bool) -> int:
    args, rest = finetune_parser().parse_known_args(argv)  # its own mistakes at once, before torch
    error = numeric_option_error(rest)
    if error:
        raise CLIError(error)
    from vlzoo.recipes import write_finetune_configs

    try:  # errors of the model reference and recipe in one line; training errors keep their traceback
        configs = write_finetune_configs(args.model, args.task, args.recipe, args.out)
    except (ValueError, KeyError, FileNotFoundError) as err:
        if not from_command_line:
            raise
        raise CLIError(err.args[0] if isinstance(err, KeyError) and err.args else str(err)) from err
    given = {a.split("=", 1)[0] for a in rest}
    if "--data.train" in given and not {"--data.val", "--data.test"} <= given:
        print("vlzoo finetune: warning: --data.train is set but --data.val/--data.test are not: validation and "
              "testing use the recipe's (shapes by default)", file=sys.stderr)
    layered = [arg for config in configs for arg in ("--config", str(config))]
    _lightning_cli(["fit", *layered, *rest])  # ROOT/config.yaml records the run, every layer applied
    return 0


# Commands that compute (train, evaluate, generate, embed): they get the thread policy.
COMPUTING = (*LIGHTNING_COMMANDS, "compare", "finetune", "capfilt", "caption", "vqa", "retrieve", "zeroshot", "embed", "data",
             "export")
DEBUG_ENV = "VLZOO_DEBUG"


def take_process_options(argv: list[str]) -> tuple[list[str], bool, str | None]:
    """``argv`` without ``--debug`` and ``--threads N`` (anywhere before a ``--``), whether
    to show tracebacks, and the thread count asked for (None: not given)."""
    rest, debug, threads = [], os.environ.get(DEBUG_ENV, "") not in ("", "0"), None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            rest += argv[i:]
            break
        if arg == "--debug":
            debug = True
        elif arg == "--threads" or arg.startswith("--threads="):
            if "=" in arg:
                threads = arg.split("=", 1)[1]
            elif i + 1 < len(argv):
                threads, i = argv[i + 1], i + 1
            else:
                raise CLIError("--threads needs a value (a number of threads, or auto)")
        else:
            rest.append(arg)
        i += 1
    return rest, debug, threads


def set_up_process(command: str | None, threads: str | None, apply: bool = True) -> None:
    """Before torch is imported: quiet the known noise and, for a computing command, choose
    the CPU thread policy (announced once, on stderr, when the work starts). ``apply``
    False (``main`` called from Python): the thread count is checked but the calling
    process's threads are left alone."""
    from vlzoo.process import (
        THREADS_ENV,
        choose_threads,
        keep_freed_memory,
        parse_threads,
        prepare_environment,
        quiet_known_noise,
    )

    quiet_known_noise()
    try:
        requested = parse_threads(threads if threads is not None else os.environ.get(THREADS_ENV),
                                  "--threads" if threads is not None else THREADS_ENV)
    except ValueError as err:
        raise CLIError(str(err)) from err
    if command not in COMPUTING or not apply:
        return
    if threads is not None:
        os.environ[THREADS_ENV] = str(requested or "auto")  # the runs this one starts (and ThreadPolicy) follow it
    choice = choose_threads(requested)
    prepare_environment(choice)
    keep_freed_memory()
    if "torch" in sys.modules:  # torch already imported: set it directly
        sys.modules["torch"].set_num_threads(choice.start)
    global _THREAD_POLICY
    _THREAD_POLICY = choice.describe()


_THREAD_POLICY: str | None = None  # what set_up_process chose, printed once when the command starts its work


def announce_thread_policy() -> None:
    """Print the thread policy once, on stderr, when a computing command starts working."""
    global _THREAD_POLICY
    if _THREAD_POLICY is not None:
        print(f"vlzoo: {_THREAD_POLICY}", file=sys.stderr, flush=True)
        _THREAD_POLICY = None


def main(argv: list[str] | None = None) -> int:
    """The ``vlzoo`` command. From Python (``argv`` given), errors raise instead of printing."""
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    debug = False
    try:
        argv, debug, threads = take_process_options(argv)
        command = next((a for a in argv if not a.startswith("-")), None)
        helping = {"-h", "--help", "--help-all"} & set(argv)
        set_up_process(None if helping else command, threads, apply=from_command_line)
        return _run(argv, from_command_line)
    except CLIError as err:
        if debug:
            raise
        print(f"vlzoo{' ' + command if command else ''}: error: {err}", file=sys.stderr)
        hint = f"vlzoo {command} --help" if command else "vlzoo --help"
        print(f"  ({hint} lists the options; --debug shows the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug or not from_command_line:
            raise
        print(f"\nvlzoo{' ' + command if command else ''}: interrupted (Ctrl-C)", file=sys.stderr)
        return 130


def config_files(args: list[str]) -> list[str]:
    """The ``--config FILE`` / ``--config=FILE`` values of a command line, in order."""
    files = []
    for i, arg in enumerate(args):
        if arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
        elif arg in ("--config", "-c") and i + 1 < len(args):
            files.append(args[i + 1])
    return files


def config_file_error(args: list[str]) -> str | None:
    """What is wrong with the ``--config`` files of a Lightning command (checked before
    torch is imported): none given, a missing file (with the closest YAML file), a
    folder, not YAML, or not a mapping of sections."""
    import yaml

    from vlzoo.cli_help import similar_file

    files = config_files(args)
    asks_for_help = {"-h", "--help", "--print_config"} & {a.split("=", 1)[0] for a in args}
    if not files and not asks_for_help and not any(a == "--model" or a.startswith(("--model=", "--model."))
                                                   for a in args):
        return "--config FILE is required (e.g. --config zoo_configs/models/clip/shapes-tiny.yaml)"
    for path in files:
        if Path(path).is_dir():
            return f"--config {path}: is a folder; expected a YAML file"
        if not Path(path).is_file():
            similar = similar_file(path)
            return f"--config: no such file {path}" + (f"; did you mean {similar}?" if similar else "")
        try:
            content = yaml.safe_load(Path(path).read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            where = getattr(err, "problem_mark", None)
            at = f" (line {where.line + 1}, column {where.column + 1})" if where is not None else ""
            return f"--config {path}: not valid YAML{at}: {getattr(err, 'problem', None) or err}"
        if content is not None and not isinstance(content, dict):
            return (f"--config {path}: expected a mapping of sections (trainer:, model:, data:, ...), "
                    f"got {type(content).__name__}")
    return None


def _run(argv: list[str], from_command_line: bool) -> int:
    if argv and argv[0] in LIGHTNING_COMMANDS:
        if "--help-all" in argv:
            argv = [("--help" if a == "--help-all" else a) for a in argv]
        elif {"-h", "--help"} & set(argv[1:]):
            print(lightning_help(argv[0], LIGHTNING_COMMANDS[argv[0]]), end="")
            return 0
        error = numeric_option_error(argv[1:]) or config_file_error(argv[1:])  # before torch is imported
        if error:
            raise CLIError(error)
        _lightning_cli(argv)
        return 0
    if argv and argv[0] == "finetune" and not {"-h", "--help"} & set(argv):
        return _finetune(argv[1:], from_command_line)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 0 if args.command is None else 2
    announce_thread_policy()
    try:
        args.run(args)
    except (ValueError, KeyError, FileNotFoundError, RuntimeError) as err:
        if not from_command_line:
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"vlzoo {args.command}: error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
