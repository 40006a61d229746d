"""Training budgets of ``vlzoo compare``: steps, samples, FLOPs or wall time, turned into
each model's number of optimizer steps.

Equal steps is not equal compute: an ALBEF or BLIP step costs about 3.5 times a CLIP
step at the same batch (3.4 and 3.7 times at the shapes recipe's). A ``flops`` budget gives every model the same training
compute; :func:`measure_step_cost` measures what one of its steps costs with torch's
flop counter (``torch.utils.flop_counter.FlopCounterMode``: the matmul, convolution and
attention FLOPs of the forward and backward pass of the first optimizer step), in a
real ``Trainer.fit`` of the model's own config, so every hook of the step runs (momentum
copies, queue, hard negatives, a frozen tower's features). A ``wall_time`` budget is
turned into steps from the seconds per step measured the same way, so that the
learning-rate schedule still ends where the run ends.
"""

from __future__ import annotations

import gc
import math
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch

KINDS = ("steps", "samples", "flops", "wall_time")
UNITS = {"steps": "optimizer steps", "samples": "training samples", "flops": "FLOPs (forward + backward)",
         "wall_time": "seconds of training"}


@dataclass(frozen=True)
class Budget:
    """``kind`` (one of :data:`KINDS`) and its ``amount`` per model."""

    kind: str
    amount: float

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"budget: expected one of {KINDS}, got {self.kind!r}")
        if not (isinstance(self.amount, (int, float)) and math.isfinite(self.amount) and self.amount > 0):
            raise ValueError(f"budget {self.kind}: expected a positive number, got {self.amount!r}")

    def steps(self, global_batch: int, cost: StepCost | None = None) -> int:
        """Optimizer steps a model gets (at least 1)."""
        if self.kind == "steps":
            return max(1, int(self.amount))
        if self.kind == "samples":
            return max(1, int(self.amount // global_batch))
        if cost is None:
            raise ValueError(f"a {self.kind} budget needs the model's measured step cost")
        per_step = cost.flops if self.kind == "flops" else cost.seconds
        if not per_step:
            raise ValueError(f"a {self.kind} budget: the measured step cost is {per_step!r}")
        return max(1, int(self.amount // per_step))

    def describe(self) -> str:
        amount = f"{self.amount:.3g}" if self.kind == "flops" else f"{self.amount:g}"
        return f"{amount} {UNITS[self.kind]} per model"


def parse_budget(recipe_budget: Any, option: str | None, where: str) -> Budget:
    """The budget of a run: the recipe's ``budget`` mapping (``by:`` the kind, and an amount
    per kind), with ``--budget KIND`` (the recipe's amount of that kind) or
    ``--budget KIND=AMOUNT`` on top. Errors name ``where`` (the recipe) or the option."""
    if not isinstance(recipe_budget, dict) or "by" not in recipe_budget:
        raise ValueError(f"{where}: budget: expected a mapping with 'by' ({'|'.join(KINDS)}) and an amount "
                         "per kind, e.g. {by: flops, flops: 3.0e13, steps: 300}")
    unknown = sorted(set(recipe_budget) - {"by", *KINDS})
    if unknown:
        raise ValueError(f"{where}: budget: unknown fields {unknown} (expected by and {', '.join(KINDS)})")
    kind, amount = recipe_budget["by"], None
    if option:
        kind, _, given = option.partition("=")
        if kind not in KINDS:
            raise ValueError(f"--budget {option}: expected KIND or KIND=AMOUNT with KIND one of {KINDS}")
        if given:
            try:
                amount = float(given)
            except ValueError:
                raise ValueError(f"--budget {option}: {given!r} is not a number") from None
    if kind not in KINDS:
        raise ValueError(f"{where}: budget.by: expected one of {KINDS}, got {kind!r}")
    if amount is None:
        if kind not in recipe_budget:
            raise ValueError(f"{where}: budget.{kind} is not set: give it in the recipe or as --budget {kind}=AMOUNT")
        amount = recipe_budget[kind]
    try:
        return Budget(kind, float(amount))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: budget.{kind}: expected a positive number, got {amount!r}") from err


# ------------------------------------------------------------------- step cost
def flop_counter_with_attention() -> torch.utils.flop_counter.FlopCounterMode:
    """torch's FLOP counter, also counting the CPU kernels of ``scaled_dot_product_attention``.

    torch counts SDPA's CUDA kernels but not its CPU flash kernel, so on CPU a model's
    attention went uncounted (while attention multiplied out by hand was counted) and the
    same step measured fewer FLOPs on CPU than on a GPU. torch's formulas for the CUDA
    kernels are applied to the CPU ones: forward 4·B·H·Lq·Lk·D, backward 2.5 times that (the
    flash kernels recompute the scores)."""
    from torch.utils import flop_counter  # imported where FLOPs are counted, as before

    def forward(query, key, value, *_, out_shape=None, **__) -> int:
        return flop_counter.sdpa_flop_count(query, key, value)

    def backward(grad_out, query, key, value, *_, out_shape=None, **__) -> int:
        return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)

    aten = torch.ops.aten
    return flop_counter.FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: forward,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: backward,
    })


@dataclass(frozen=True)
class StepCost:
    """What one optimizer step of a model costs: ``flops`` (forward + backward, all ranks)
    and ``seconds`` (median wall time of the timed steps; None when none were timed)."""

    flops: float
    seconds: float | None = None


class StepCostMeter(L.Callback):
    """Counts the FLOPs of the first optimizer step (everything from the first batch's
    start to the optimizer update, micro-batches included) and times each later step
    (from one optimizer update to the next, data loading included)."""

    def __init__(self) -> None:
        self.flops: float | None = None
        self.step_seconds: list[float] = []
        self._counter = None
        self._last_update: float | None = None
        self._world_size = 1

    def on_train_batch_start(self, trainer, module, batch, batch_idx: int) -> None:
        if self.flops is None and self._counter is None:
            self._counter = flop_counter_with_attention()
            self._counter.__enter__()

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        if self._counter is not None:
            self.close()
            return
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)
        now = time.perf_counter()
        if self._last_update is not None:
            self.step_seconds.append(now - self._last_update)
        self._last_update = now

    def close(self) -> None:
        """Leave the flop counter (if still counting) and keep its total."""
        if self._counter is not None:
            counter, self._counter = self._counter, None
            counter.__exit__(None, None, None)
            if self.flops is None:
                self.flops = float(counter.get_total_flops()) * self._world_size

    def setup(self, trainer, module, stage: str) -> None:
        self._world_size = trainer.world_size

    def on_exception(self, trainer, module, exception: BaseException) -> None:
        self.close()

    def teardown(self, trainer, module, stage: str) -> None:
        self.close()


def measure_step_cost(fit_args: list[str], build_run: Callable[[list[str]], Any], timed_steps: int = 0) -> StepCost:
    """Run ``1 + timed_steps`` optimizer steps (``timed_steps`` > 0: one more, so that
    ``timed_steps`` intervals between updates are timed after the first) of the model
    ``fit_args`` describes (the options of ``vlzoo fit``, without the subcommand) in this
    process, in a scratch run directory that is removed afterwards, and return its
    :class:`StepCost`. ``build_run`` builds the run from options without running it
    (:func:`vlzoo.cli.build_lightning_run`). Hooks outside the step
    (``finetune.init_from``) do not run."""
    scratch = Path(tempfile.mkdtemp(prefix="vlzoo-step-cost-"))
    try:
        run = build_run([
            *fit_args, "--trainer.default_root_dir", str(scratch),
            "--trainer.max_steps", str(1 + timed_steps + (timed_steps > 0)),
            "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0", "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.val_check_interval", "null", "--trainer.check_val_every_n_epoch", "1"])
        meter = StepCostMeter()
        run.trainer.callbacks.append(meter)
        try:
            run.trainer.fit(run.model, datamodule=run.datamodule)
        finally:
            meter.close()
            del run
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        gc.collect()  # the measured model's memory back before the real runs start
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if meter.flops is None:
        raise RuntimeError(f"measuring the step cost of vlzoo fit {' '.join(fit_args)}: no optimizer step ran")
    seconds = statistics.median(meter.step_seconds) if meter.step_seconds else None
    return StepCost(meter.flops, seconds)
