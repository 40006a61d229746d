"""The base LightningModule: optimizer groups, warm-up + cosine schedule, evaluation."""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import Tensor, nn

from vlzoo.artefacts import resolve_vision
from vlzoo.callbacks import Preemption, RNGState, RunCheckpoint, RunStats, SkippedSamples
from vlzoo.checkpoints import AtomicCheckpointIO
from vlzoo.config import EvalConfig, FinetuneConfig, OptimConfig, VisionConfig, as_config
from vlzoo.data.datamodule import EvalAnnotations
from vlzoo.data.image_text import TooManyBadSamples
from vlzoo.data.tokenizers import Tokenizer
from vlzoo.distributed import gather_objects, local_tensor
from vlzoo.eval.evaluator import Evaluator, RetrievalEvaluator, class_embeddings
from vlzoo.finetune import layer_scales, load_initial_weights, prepare_model, trainable_summary
from vlzoo.models.blip2 import FrozenImageEncoder
from vlzoo.parallel import (
    FSDPOptions,
    average_replicated_gradients,
    begin_evaluation,
    data_parallel_mesh,
    end_evaluation,
    register_strategies,
    shard_model,
)
from vlzoo.weights import load_strict

register_strategies()  # --trainer.strategy fsdp2


def parameter_groups(model: nn.Module, weight_decay: float, lr: float, layer_decay: float = 1.0
                     ) -> list[dict[str, Any]]:
    """AdamW groups of the trainable parameters: weight decay for weight matrices, none
    for ``model.no_weight_decay()`` (norms, biases, embeddings, temperature) and every
    0-/1-d parameter; one group per learning-rate scale under ``layer_decay``
    (:func:`vlzoo.finetune.layer_scales`)."""

    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    scales = layer_scales(model, layer_decay)
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decays = not (name in skip or p.ndim <= 1)
        groups.setdefault((decays, scales[name]), []).append(p)
    for decays in (True, False):  # both groups always exist (optimizer state layouts stay comparable)
        groups.setdefault((decays, 1.0), [])
    return [{"params": params, "weight_decay": weight_decay if decays else 0.0, "lr": lr * scale}
            for (decays, scale), params in sorted(groups.items(), key=lambda kv: (not kv[0][0], -kv[0][1]))]


def resolved_tower(config: Any) -> tuple[Any, Callable[[nn.Module], None]]:
    """The explicit resolution step of a model config's vision tower, before its builder
    runs: ``vision: {impl: vlzoo, name: zoo:... or a checkpoint}`` becomes that tower's own
    config (a ``zoo:`` artefact is trained first when missing). Returns the config with
    the concrete tower and what loads the tower's weights into the built model (nothing
    when the tower was no reference)."""
    vision, state = resolve_vision(config.vision)
    if state is None:
        return config, lambda model: None

    def load_tower(model: nn.Module) -> None:
        encoder = model.vision.encoder if isinstance(model.vision, FrozenImageEncoder) else model.vision
        load_strict(encoder, state, source=f"vision tower of {config.vision.name}")

    return dataclasses.replace(config, vision=vision), load_tower


def record_resolved_tower(task, given: Any, resolved: Any) -> None:
    """When a reference was resolved, the task's checkpoint records the concrete tower
    (its weights are in the state dict), as a plain dict as LightningCLI records configs."""
    if resolved is not given:
        task.hparams["model"] = dataclasses.asdict(resolved)


FUSED_ADAMW_DEVICES = {"cuda": (2, 0), "cpu": (2, 4)}  # device -> the first torch with a fused AdamW there


def use_fused_adamw(params: list[Tensor], grad_scaler: bool = False) -> bool:
    """Whether torch's fused AdamW can update ``params``: floating-point plain tensors
    (not FSDP2's DTensors) on a device this torch has the kernel for, and no fp16 grad
    scaler (Lightning's gradient clipping refuses a fused optimizer under one). One
    kernel launch for all parameters instead of a dozen foreach kernels (CPU, 2 M
    parameters: about 3x faster)."""
    version = tuple(int(part) for part in torch.__version__.split(".")[:2])
    return not grad_scaler and bool(params) and all(
        p.device.type in FUSED_ADAMW_DEVICES and version >= FUSED_ADAMW_DEVICES[p.device.type]
        and p.dtype.is_floating_point and local_tensor(p) is p for p in params)


def set_fused(optimizer: torch.optim.Optimizer, fused: bool) -> None:
    """Make ``optimizer`` (its state perhaps loaded from a checkpoint, which brings the
    saved groups' ``fused`` flag along) use the fused kernel or not, with its step
    counters where that kernel wants them (fused: on the parameter's device; foreach:
    on the CPU, so no step reads a device value back)."""
    for group in optimizer.param_groups:
        group["fused"] = fused
        if fused:
            group["foreach"] = None
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if torch.is_tensor(state.get("step")):
                device = p.device if fused or group.get("capturable") else "cpu"
                state["step"] = state["step"].to(device=device, dtype=torch.float32)


class NonFiniteTrainingError(RuntimeError):
    """Too many optimizer steps in a row had non-finite gradients."""


def all_gradients_finite(model: nn.Module) -> Tensor:
    """0-d bool tensor on the gradients' device: every gradient finite, on every rank (all
    ranks agree, so all skip together). Reads nothing back to the host."""
    grads = [local_tensor(p.grad) for p in model.parameters() if p.grad is not None]  # FSDP: this rank's shard
    finite = torch.stack([torch.isfinite(g).all() for g in grads]).all() if grads else torch.tensor(True)
    flag = finite.float().reshape(1)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return flag[0] > 0


def gradients_finite(model: nn.Module) -> bool:
    """:func:`all_gradients_finite` read on the host."""
    return bool(all_gradients_finite(model))


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` can skip a step on the device: torch's fused Adam/AdamW kernel
    takes a ``found_inf`` flag (as the fp16 grad scaler uses it) and leaves the parameters,
    moments and step counts alone where it is 1."""
    return isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW) and all(
        g.get("fused") for g in optimizer.param_groups)


def compile_methods(model: nn.Module, names: tuple[str, ...], compile: bool | str) -> None:
    """``torch.compile`` the methods ``names`` of ``model`` in place (``forward`` through
    ``nn.Module.compile``, others as compiled bound methods): parameter names and
    checkpoints unchanged. ``compile`` True: the default backend, a string: that backend."""
    options = {} if compile is True else {"backend": compile}
    for name in names:
        if name == "forward":
            model.compile(**options)
        else:
            setattr(model, name, torch.compile(getattr(model, name), **options))


class DeviceSkipCounter:
    """Optimizer steps skipped on the device since the last host read, kept as device
    tensors: all skipped, the current run in a row (continuing ``in_a_row`` from the host)
    and the longest run. :meth:`add` reads nothing; :meth:`read` is the one host read."""

    def __init__(self, in_a_row: int, device: torch.device):
        self.skipped = torch.zeros((), dtype=torch.long, device=device)
        self.in_a_row = torch.full((), in_a_row, dtype=torch.long, device=device)
        self.longest = self.in_a_row.clone()

    def add(self, finite: Tensor) -> None:
        """Count one step; ``finite`` (0-d bool) False: it was skipped."""
        skipped = (~finite).long()
        self.skipped = self.skipped + skipped
        self.in_a_row = (self.in_a_row + 1) * skipped
        self.longest = torch.maximum(self.longest, self.in_a_row)

    def read(self) -> tuple[int, int, int]:
        """(skipped, current run in a row, longest run) on the host."""
        skipped, in_a_row, longest = torch.stack([self.skipped, self.in_a_row, self.longest]).tolist()
        return skipped, in_a_row, longest


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Learning-rate multiplier: linear warm-up to 1, cosine decay to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class VLTask(L.LightningModule):
    """What every task shares: optimizer groups and schedule, non-finite step skipping,
    fine-tuning structure, FSDP hooks, checkpoint bookkeeping, and the evaluation loop
    (per-image outputs collected, gathered over ranks, scored by :attr:`evaluator`).

    Subclasses set ``self.model``, ``self.tokenizer`` and ``self.preprocess_config``,
    implement :meth:`training_step` and :meth:`embed_images`, and choose their
    :class:`~vlzoo.eval.evaluator.Evaluator` (:meth:`make_evaluator`; default ITC
    retrieval: ``{stage}/r{1,5,10}_{i2t,t2i}``, ``compositional_acc``, ``zeroshot_acc``).
    """

    model: nn.Module
    tokenizer: Tokenizer
    preprocess_config: VisionConfig
    family: str | None = None  # the registry name of the model family it trains (vlzoo.families)
    monitor: str = "val/r1_t2i"
    monitor_mode: str = "max"  # whether a larger monitored value is better

    def __init__(self, optim: OptimConfig, eval: EvalConfig, finetune: FinetuneConfig | None = None):
        super().__init__()
        # copies: the signatures' default configs are shared objects, and a task may change its own
        self.optim = dataclasses.replace(optim) if dataclasses.is_dataclass(optim) else optim
        self.eval_config = dataclasses.replace(eval) if dataclasses.is_dataclass(eval) else eval
        self.finetune = as_config(finetune or FinetuneConfig(), FinetuneConfig, "finetune")
        self._finetune_ready = False
        self._weights_loaded = False
        self._initial_parts = None  # what finetune.init_from names, once resolved
        self._eval_outputs: list[tuple[Tensor, Tensor]] = []
        self._evaluator: Evaluator | None = None
        self._skipped_steps = 0
        self._nonfinite_in_a_row = 0
        self._skips_on_device: DeviceSkipCounter | None = None  # not yet read (fused AdamW skips on the device)
        self._unreported_skips = (0, 0)  # read but not yet reported: skips, longest run in a row

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._fold_skips()  # the counts travel in the checkpoint; reporting waits for the next check
        cls = type(self)
        checkpoint["vlzoo_task"] = f"{cls.__module__}.{cls.__qualname__}"
        checkpoint["vlzoo_skipped_steps"] = [self._skipped_steps, self._nonfinite_in_a_row]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._skipped_steps, self._nonfinite_in_a_row = checkpoint.get("vlzoo_skipped_steps", [0, 0])
        self.prepare_finetune()  # LoRA adapters exist before the state dict is loaded
        self._weights_loaded = True  # the checkpoint's weights, not finetune.init_from's

    # ------------------------------------------------------------------ fine-tuning
    def prepare_finetune(self) -> None:
        """Once: LoRA adapters, frozen parts, gradient checkpointing (``self.finetune``)."""
        if self._finetune_ready:
            return
        done = prepare_model(self.model, self.finetune)
        self._finetune_ready = True
        if done:
            print(f"vlzoo: finetune {done}: {trainable_summary(self.model)}", file=sys.stderr, flush=True)

    def skip_initial_weights(self) -> None:
        """Do not load ``finetune.init_from`` (a resumed run restores its own checkpoint)."""
        self._weights_loaded = True

    def initial_state(self, parts) -> tuple[dict[str, Tensor], tuple[str, ...]]:
        """(state dict for ``self.model``, key substrings allowed to be missing) from the
        :class:`~vlzoo.hub.convert.LoadedParts` of ``finetune.init_from``. Default: a
        model of this task's own family, as is."""
        if parts.family != self.family:
            raise ValueError(f"finetune.init_from {parts.source}: a {parts.family} model cannot start a "
                             f"{type(self).__name__} ({self.family} weights expected)")
        return parts.model.state_dict(), ()

    def use_initial_weights(self, parts) -> None:
        """The model ``finetune.init_from`` names, resolved by the caller (``vlzoo fit`` and
        ``vlzoo finetune`` do it with :func:`vlzoo.hub.loaders.load_parts`): loaded into
        ``self.model`` at :meth:`configure_model`."""
        self._initial_parts = parts

    def load_initial_weights(self, parts=None) -> None:
        """Load ``parts`` (default: those given to :meth:`use_initial_weights`) into
        ``self.model``, strictly (see :meth:`initial_state`)."""
        parts = parts if parts is not None else self._initial_parts
        if parts is None:
            raise ValueError(f"finetune.init_from {self.finetune.init_from}: not resolved. vlzoo fit resolves it; "
                             "from Python, call task.use_initial_weights(vlzoo.hub.loaders.load_parts(REF)) first")
        state, allow_missing = self.initial_state(parts)
        load_initial_weights(self.model, state, f"finetune.init_from {self.finetune.init_from}", allow_missing)
        self._weights_loaded, self._initial_parts = True, None
        print(f"vlzoo: started from {self.finetune.init_from} ({parts.family})", file=sys.stderr, flush=True)

    def total_loss(self, losses: dict[str, Tensor]) -> Tensor:
        """The sum of the named losses ``finetune.losses`` (default: all of them)."""
        chosen = self.finetune.losses
        if not chosen:
            return sum(losses.values())
        unknown = sorted(set(chosen) - set(losses))
        if unknown:
            raise ValueError(f"finetune.losses: {unknown} are not losses of {type(self).__name__} "
                             f"(it has {sorted(losses)})")
        return sum(losses[k] for k in chosen)

    def setup(self, stage: str) -> None:
        """Checkpoints are written atomically wherever the strategy uses plain torch.save."""
        strategy = self.trainer.strategy
        if type(strategy.checkpoint_io) is TorchCheckpointIO:
            strategy.checkpoint_io = AtomicCheckpointIO()

    # ------------------------------------------------------------------ sharding
    fsdp_keep_fp32: bool = False  # True: FSDP never casts the trainable units (BLIP-2's Q-Former)
    training_methods: tuple[str, ...] = ("forward",)  # what training_step calls on self.model (optim.compile)

    def configure_model(self) -> None:
        """Fine-tuning structure and initial weights (``self.finetune``), then, under
        Lightning's ``ModelParallelStrategy`` (e.g. ``--trainer.strategy fsdp2``): FSDP2
        over the data-parallel mesh, at the blocks, frozen parts and root of
        ``self.model`` (see :mod:`vlzoo.parallel`)."""
        self.prepare_finetune()
        # without a trainer the task is being rebuilt from its own checkpoint (load_from_checkpoint)
        if self.finetune.init_from and not self._weights_loaded and self._trainer is not None:
            self.load_initial_weights()
        if self.device_mesh is None:
            return
        options = getattr(self.trainer.strategy, "fsdp_options", None) or FSDPOptions()
        shard_model(self.model, data_parallel_mesh(self.device_mesh), options, keep_fp32=self.fsdp_keep_fp32)

    def _begin_evaluation(self) -> None:
        begin_evaluation(self.model)  # FSDP: the root gathered, decoding in lockstep

    def _end_evaluation(self) -> None:
        end_evaluation(self.model)

    on_validation_start = on_test_start = on_predict_start = _begin_evaluation
    on_validation_end = on_test_end = on_predict_end = _end_evaluation

    def on_after_backward(self) -> None:
        average_replicated_gradients(self.model)  # FSDP: the 0-d parameters it does not shard

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        o = self.optim
        groups = parameter_groups(self.model, o.weight_decay, o.lr, self.finetune.layer_decay)
        optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, fused=self._fused_adamw(groups))
        total = int(self.trainer.estimated_stepping_batches)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, o.warmup_steps, total, o.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def _fused_adamw(self, groups: list[dict[str, Any]]) -> bool:
        """``optim.fused``, or (None) wherever :func:`use_fused_adamw` says it can run."""
        if self.optim.fused is not None:
            return self.optim.fused
        scaler = self._trainer is not None and getattr(self.trainer.precision_plugin, "scaler", None) is not None
        return use_fused_adamw([p for g in groups for p in g["params"]], grad_scaler=scaler)

    def on_train_start(self) -> None:
        """A resumed run's optimizer state came with the saved ``fused`` flag: apply this
        run's choice again. ``optim.compile``: compile the model's forward."""
        for optimizer in self.trainer.optimizers:
            set_fused(optimizer, self._fused_adamw(optimizer.param_groups))
        self.use_micro_batches()
        if self.optim.compile:
            compile_methods(self.model, self.training_methods, self.optim.compile)

    def use_micro_batches(self) -> None:
        """Give ``optim.micro_batches`` to the model: a clear error when it is not a
        positive integer, or where parts would not give the whole batch's step."""
        k = self.optim.micro_batches
        if type(k) is not int or k < 1:
            raise ValueError(f"optim.micro_batches: expected a positive integer, got {k!r}")
        if k > 1:
            problem = self._micro_batch_problem()
            if problem:
                raise ValueError(f"optim.micro_batches {k}: {problem}")
        if hasattr(self.model, "micro_batches"):
            self.model.micro_batches = k

    def _micro_batch_problem(self) -> str | None:
        """Why this task cannot run its step in micro-batches, or None."""
        if not hasattr(self.model, "micro_batches"):
            return (f"{type(self).__name__} does not split its step into micro-batches (the contrastive "
                    "families clip, albef, blip, blip2 stage 1 do); use trainer.accumulate_grad_batches")
        norms = sorted({type(m).__name__ for m in self.model.modules()
                        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training})
        if norms:
            return (f"the model has batch-normalisation layers in training mode ({', '.join(norms)}, e.g. a ResNet "
                    "tower), which would normalise each part on its own rows; use a ViT tower or set it to 1")
        strategy = type(self.trainer.strategy).__name__ if self._trainer is not None else ""
        if self.device_mesh is not None or "FSDP" in strategy:
            return (f"not supported under sharding ({strategy}): recomputing a part gathers its blocks again and "
                    "keeps them gathered through its backward; use DDP, or set it to 1")
        if self.optim.compile:
            return "not tested together with optim.compile; set one of them off"
        return None

    def configure_callbacks(self):
        """RNG states, preemption, run statistics, skipped-sample counts, and a
        :class:`~vlzoo.callbacks.RunCheckpoint` with its defaults unless the trainer has
        one (``vlzoo fit --checkpoint.every_n_steps ...``)."""
        callbacks = [RunStats(), SkippedSamples(), RNGState(), Preemption()]
        trainer_callbacks = self.trainer.callbacks if self._trainer is not None else []
        if not any(isinstance(c, RunCheckpoint) for c in trainer_callbacks):
            callbacks.insert(0, RunCheckpoint())  # replaces the Trainer's default ModelCheckpoint
        return callbacks

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        """Forward and backward (the closure), then the optimizer step and
        :meth:`after_optimizer_step` (once per step, so gradient accumulation is
        respected) unless a gradient is not finite on some rank: then the step is
        skipped on every rank and counted (``train/skipped_steps``); after
        ``optim.max_nonfinite_steps`` in a row the run saves a checkpoint and stops."""
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:  # fp16: the grad scaler skips inf
            super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
            self.after_optimizer_step()
            return
        loss = optimizer_closure() if optimizer_closure is not None else None
        raw = getattr(optimizer, "optimizer", optimizer)  # under Lightning's wrapper
        if skips_on_device(raw):
            self._step_or_skip_on_device(optimizer, raw, loss)
            return
        if gradients_finite(self.model):
            self._nonfinite_in_a_row = 0
            optimizer.step(closure=lambda: loss)
            self.after_optimizer_step()
        else:
            optimizer.zero_grad(set_to_none=True)
            self.skip_optimizer_step()
        self.log("train/skipped_steps", float(self._skipped_steps))

    def _step_or_skip_on_device(self, optimizer, raw: torch.optim.Optimizer, loss: Tensor | None) -> None:
        """The fused kernel's step, skipped on the device where a gradient is not finite,
        and what follows it (:meth:`after_optimizer_step` with ``applied``) masked alike: no
        host read in the step. The skips are counted on the device and read every
        :meth:`nonfinite_check_interval` steps (each step on a CPU, where reading costs nothing)."""
        finite = all_gradients_finite(self.model)
        raw.found_inf = (~finite).float()
        try:
            optimizer.step(closure=lambda: loss)
        finally:
            raw.found_inf = None
        self.after_optimizer_step(applied=finite)
        if self._skips_on_device is None:
            self._skips_on_device = DeviceSkipCounter(self._nonfinite_in_a_row, finite.device)
        self._skips_on_device.add(finite)
        if (self.global_step + 1) % self.nonfinite_check_interval() == 0:
            self._read_skips()
        pending = self._skips_on_device
        self.log("train/skipped_steps", float(self._skipped_steps) if pending is None
                 else (pending.skipped + self._skipped_steps).float())

    def nonfinite_check_interval(self) -> int:
        """Steps between host reads of the on-device skip counters: 1 on a CPU, Lightning's
        ``log_every_n_steps`` on an accelerator."""
        on_cpu = self.device.type == "cpu"
        return 1 if on_cpu or self._trainer is None else max(1, self.trainer.log_every_n_steps)

    def _fold_skips(self) -> None:
        """Move the on-device skip counts into the host counters (nothing reported yet)."""
        if self._skips_on_device is None:
            return
        skipped, self._nonfinite_in_a_row, longest = self._skips_on_device.read()
        self._skips_on_device = None
        self._skipped_steps += skipped
        self._unreported_skips = (self._unreported_skips[0] + skipped, max(self._unreported_skips[1], longest))

    def _read_skips(self) -> None:
        """Fold the on-device skip counters; report, and stop as :meth:`skip_optimizer_step`
        does when any run of skips since the last read reached the limit."""
        self._fold_skips()
        (skipped, longest), self._unreported_skips = self._unreported_skips, (0, 0)
        if skipped:
            print(f"vlzoo: step {self.global_step}: non-finite gradients, {skipped} optimizer step(s) skipped "
                  f"(longest run {longest}, {self._nonfinite_in_a_row} in a row now, {self._skipped_steps} in all)",
                  flush=True)
        self._stop_if_persistent(longest)

    def skip_optimizer_step(self) -> None:
        """Bookkeeping of a skipped step; subclasses also drop what the step would have
        applied (e.g. features waiting to be enqueued)."""
        self._skipped_steps += 1
        self._nonfinite_in_a_row += 1
        print(f"vlzoo: step {self.global_step}: non-finite gradients, optimizer step skipped "
              f"({self._nonfinite_in_a_row} in a row, {self._skipped_steps} in all)", flush=True)
        self._stop_if_persistent()

    def _stop_if_persistent(self, longest_run: int | None = None) -> None:
        """Save and stop once ``optim.max_nonfinite_steps`` steps in a row were skipped
        (``longest_run``: the longest such run since the last check, else the current one)."""
        limit = self.optim.max_nonfinite_steps
        if max(self._nonfinite_in_a_row, longest_run or 0) >= limit:
            path = Path(self.trainer.default_root_dir) / "checkpoints" / f"nonfinite-step{self.global_step}.ckpt"
            self.trainer.save_checkpoint(path)
            raise NonFiniteTrainingError(
                f"{limit} optimizer steps in a row had non-finite gradients (loss or gradients NaN/inf; "
                f"optim.max_nonfinite_steps={limit}). Saved {path}. Lower the learning rate, use bf16 rather "
                "than fp16, or check the data.")

    def after_optimizer_step(self, applied: Tensor | None = None) -> None:
        """Clamps, EMA updates, enqueues: what must follow each optimizer step.
        ``applied``: 0-d bool, whether the step was taken (a step skipped on the device,
        whose followers must change nothing where it is False); None: it was."""

    # -------------------------------------------------------------------- evaluation
    def embed_images(self, pixel_values: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, D) normalised embeddings."""
        raise NotImplementedError

    def embed_texts(self, texts: list[str]) -> Tensor:
        """Strings -> (T, D) normalised embeddings (``self.model.encode_text``), in
        batches of ``eval.text_batch_size``."""
        size = self.eval_config.text_batch_size
        chunks = [self.model.encode_text(**self.tokenize(texts[i : i + size])) for i in range(0, len(texts), size)]
        return torch.cat(chunks)

    def class_embeddings(self, classes: list[str]) -> Tensor:
        """(C, D) normalised mean text embedding of each class over ``eval.zeroshot_templates``."""
        return class_embeddings(self.embed_texts, classes, self.eval_config.zeroshot_templates)

    def itc_similarity(self, image_embeds: Tensor, text_embeds: Tensor) -> Tensor:
        """(N, ...) image and (T, D) text embeddings -> (N, T) similarity. Default: cosine."""
        return image_embeds @ text_embeds.T

    @property
    def evaluator(self) -> Evaluator:
        """This task's :class:`~vlzoo.eval.evaluator.Evaluator` (built on first use)."""
        if self._evaluator is None:
            self._evaluator = self.make_evaluator()
        return self._evaluator

    def make_evaluator(self) -> Evaluator:
        """ITC retrieval, compositional and zero-shot metrics; families override."""
        return RetrievalEvaluator(self, self.eval_config)

    def tokenize(self, texts: list[str]) -> dict[str, Tensor]:
        """Strings -> ``input_ids``/``attention_mask`` (B, L) on this task's device."""
        return {k: v.to(self.device) for k, v in self.tokenizer(texts).items()}

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        if len(batch["index"]) == 0:  # every image of the batch was a bad sample
            return
        outputs = {k: v.float().cpu() for k, v in self.evaluator.image_outputs(batch["pixel_values"]).items()}
        self._eval_outputs.append((batch["index"].cpu(), outputs))

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_validation_epoch_end(self) -> None:
        self._finish_eval("val")

    def on_test_epoch_end(self) -> None:
        self._finish_eval("test")

    def _gathered_image_outputs(self) -> tuple[Tensor, dict[str, Tensor]] | None:
        """Every rank's per-image outputs, deduplicated and in dataset order, and the
        (N,) dataset index of each; None when no rank evaluated an image."""
        parts = gather_objects(self._eval_outputs)
        self._eval_outputs = []
        rows = [row for part in parts for row in part]
        if not rows:
            return None
        index = torch.cat([i for i, _ in rows])
        order = torch.argsort(index, stable=True)  # samplers may pad with repeated items
        keep = torch.ones_like(index, dtype=torch.bool)
        keep[1:] = index[order][1:] != index[order][:-1]
        return index[order][keep], {k: torch.cat([out[k] for _, out in rows])[order][keep] for k in rows[0][1]}

    def _finish_eval(self, stage: str) -> None:
        if self.trainer.sanity_checking:
            self._eval_outputs = []
            return
        gathered = self._gathered_image_outputs()  # every rank takes part, even one without images
        if gathered is None:
            split = {"val": "val", "test": "test"}.get(stage, stage)
            raise TooManyBadSamples(f"data.{split}: no image of the {stage} split could be read (every sample was "
                                    "bad; see the warnings above): check image paths and data.image_root")
        index, outputs = gathered
        images = {k: v.to(self.device) for k, v in outputs.items()}
        ann: EvalAnnotations = self.trainer.datamodule.annotations(stage)
        if len(index) != len(ann.captions):  # images that failed to decode were skipped
            ann = ann.subset(index.tolist())
        metrics = self.evaluator.evaluate(images, ann, getattr(self.trainer.datamodule, "answer_prior", None))
        self.log_dict({f"{stage}/{k}": v for k, v in metrics.items()}, sync_dist=False)

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:  # noqa: D102
        return {"index": batch["index"], "image_embeds": self.embed_images(batch["pixel_values"])}
