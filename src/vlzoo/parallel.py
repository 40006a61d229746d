"""Sharded training (FSDP) for every family.

FSDP2 (``torch.distributed.fsdp.fully_shard``) is applied in
:meth:`vlzoo.tasks.base.VLTask.configure_model` when the trainer runs Lightning's
``ModelParallelStrategy`` (CPU with gloo, or GPUs). :class:`FSDP2Strategy` is that
strategy with a pure data-parallel mesh by default and the FSDP options of this module
(``--trainer.strategy fsdp2`` on the command line). On GPUs the classic ``fsdp``
strategy works too, with :func:`fsdp1_wrap_policy` wrapping the same units.

Sharding units, found by structure rather than by model name:

1. the transformer blocks: every child of an ``nn.ModuleList``/``nn.Sequential`` whose
   children are all non-leaf modules of one class (timm and open_clip towers, the shared
   BERT-style block of ALBEF/BLIP/Q-Former, Hugging Face LLM layers);
2. every embedding table with the heads tied to it (callers embed ids directly, e.g.
   BLIP-2's soft prompt before the LLM's own embeddings);
3. every largest submodule whose parameters are all frozen (momentum copies, BLIP-2's
   frozen image encoder and LLM), so frozen and trainable parameters never share a unit;
4. the root, holding the rest (projections, norms, heads); its 0-d parameters
   (temperatures, logit scales) stay replicated, their gradients averaged over ranks.

Modules of one pass that share a parameter (BLIP's encoder and decoder blocks, ALBEF's
momentum text model and its tied MLM head) become one unit. Buffers (the feature queues)
are not sharded: they stay replicated, and every rank enqueues the same gathered features.
"""

from __future__ import annotations

import functools
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlzoo.distributed import is_distributed
from vlzoo.models.generation import set_generation_lockstep

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}


@dataclass
class FSDPOptions:
    """What :func:`shard_model` does besides sharding.

    activation_checkpointing: recompute each block's activations in the backward pass.
    param_dtype: ``bf16``/``fp16`` to run trainable units in that dtype (master weights
        and gradient reduction stay fp32); None: as loaded. Frozen units keep their own
        dtype (``frozen_precision``/``llm_precision`` of BLIP-2).
    reshard_after_forward: free the gathered parameters after each unit's forward
        (ZeRO-3); False keeps them until the backward (ZeRO-2, more memory, fewer gathers).
    """

    activation_checkpointing: bool = False
    param_dtype: str | None = None
    reshard_after_forward: bool = True


def is_sharded(model: nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``model``."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


# ------------------------------------------------------------------------ the units
def _has_own_structure(module: nn.Module) -> bool:
    return any(True for _ in module.children()) and any(True for _ in module.parameters())


def _block_lists(model: nn.Module) -> list[list[nn.Module]]:
    """Children of repeated-layer containers (transformer blocks), outermost first."""
    found: list[list[nn.Module]] = []
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside or not isinstance(module, (nn.ModuleList, nn.Sequential)):
            continue
        children = list(module.children())
        if children and len({type(c) for c in children}) == 1 and all(_has_own_structure(c) for c in children):
            found.append(children)
            inside.update(id(m) for c in children for m in c.modules())
    return found


def _frozen_modules(model: nn.Module, taken: set[int]) -> list[nn.Module]:
    """Largest submodules (not the root) whose parameters are all frozen and not in ``taken``."""
    out: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            params = [p for p in child.parameters() if id(p) not in taken]
            if params and not any(p.requires_grad for p in params):
                out.append(child)
            elif params:
                visit(child)

    visit(model)
    return out


def _group_by_shared_parameters(modules: list[nn.Module]) -> list[list[nn.Module]]:
    """Modules that share a parameter (directly or through others) end up in one group."""
    parent = list(range(len(modules)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[int, int] = {}
    for i, module in enumerate(modules):
        for p in module.parameters():
            j = owner.setdefault(id(p), i)
            parent[find(i)] = find(j)
    groups: dict[int, list[nn.Module]] = {}
    for i, module in enumerate(modules):
        groups.setdefault(find(i), []).append(module)
    return list(groups.values())


def _embedding_units(model: nn.Module, taken: set[int]) -> list[list[nn.Module]]:
    """Each token/position embedding outside the blocks, with the modules its weight is
    tied to (LM heads): callers use them outside their parent's ``forward`` (a soft
    prompt is concatenated to ``llm.get_input_embeddings()(ids)``)."""
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding) and id(m.weight) not in taken]
    tied = [m for m in model.modules() if not isinstance(m, nn.Embedding)
            and any(p is e.weight for e in embeddings for p in m.parameters(recurse=False))]
    return _group_by_shared_parameters(embeddings + tied)


def sharding_units(model: nn.Module) -> tuple[list[list[nn.Module]], list[list[nn.Module]]]:
    """The units of ``model`` below the root, innermost first: (block units, the others:
    embeddings with their tied heads, then frozen parts). Each unit is a list of modules
    sharded together."""
    blocks = [b for group in _block_lists(model) for b in group]
    taken = {id(p) for b in blocks for p in b.parameters()}
    embedding_units = _embedding_units(model, taken)
    taken |= {id(p) for unit in embedding_units for m in unit for p in m.parameters()}
    return _group_by_shared_parameters(blocks), embedding_units + _group_by_shared_parameters(
        _frozen_modules(model, taken))


def _checkpointed(module: nn.Module) -> None:
    """Recompute ``module``'s forward in the backward pass (instance-level, names unchanged)."""
    forward = module.forward

    @functools.wraps(forward)
    def run(*args: Any, **kwargs: Any):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    module.forward = run


def shard_model(model: nn.Module, mesh, options: FSDPOptions | None = None, keep_fp32: bool = False) -> None:
    """Apply FSDP2 to ``model`` in place: its blocks, its frozen parts, then the root.

    mesh: a 1-d data-parallel ``DeviceMesh``. keep_fp32: never cast trainable units
    (BLIP-2's Q-Former stays fp32, as the paper does).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    options = options or FSDPOptions()
    if is_sharded(model):
        return
    refuse_length_buckets(model, "FSDP2")
    trainable_policy = MixedPrecisionPolicy()
    if options.param_dtype and not keep_fp32:
        if options.param_dtype not in DTYPES:
            raise ValueError(f"param_dtype must be one of {sorted(DTYPES)} or null, got {options.param_dtype!r}")
        trainable_policy = MixedPrecisionPolicy(param_dtype=DTYPES[options.param_dtype], reduce_dtype=torch.float32)
    # 0-d parameters (temperatures, logit scale/bias) cannot be sharded: they stay
    # replicated, and average_replicated_gradients averages their gradients instead.
    scalars = {p for p in model.parameters() if p.ndim == 0}
    model._replicated_parameters = [p for p in scalars if p.requires_grad]
    shard = functools.partial(fully_shard, mesh=mesh, reshard_after_forward=options.reshard_after_forward,
                              ignored_params=scalars)
    block_units, other_units = sharding_units(model)
    for unit in block_units + other_units:
        frozen = not any(p.requires_grad for m in unit for p in m.parameters())
        if options.activation_checkpointing and not frozen and unit in block_units:
            for module in unit:
                _checkpointed(module)
        shard(unit if len(unit) > 1 else unit[0], mp_policy=MixedPrecisionPolicy() if frozen else trainable_policy)
    shard(model, mp_policy=trainable_policy)
    from torch.distributed.fsdp import register_fsdp_forward_method

    for name in getattr(model, "fsdp_forward_methods", ()):  # training entries other than forward
        register_fsdp_forward_method(model, name)
    # Make ``model`` the root now: a frozen unit may run before the first forward of the
    # root (BLIP-2 computes frozen image tokens first), and FSDP takes the first unit to
    # run as the root. torch has no public call for this; a torch upgrade that changes it
    # fails the FSDP tests in tests/tasks/test_parallel.py.
    model._get_fsdp_state()._lazy_init()


def begin_evaluation(model: nn.Module) -> None:
    """Evaluation and generation call many methods of the model besides ``forward``:
    gather the root's own parameters until :func:`end_evaluation` (blocks and frozen
    units gather through their own hooks) and decode in lockstep over ranks. A no-op
    unless sharded."""
    if is_sharded(model):
        model.unshard()
        set_generation_lockstep(True)


def end_evaluation(model: nn.Module) -> None:
    if is_sharded(model):
        set_generation_lockstep(False)
        model.reshard()


def average_replicated_gradients(model: nn.Module) -> None:
    """Average over ranks the gradients of the parameters FSDP left replicated (the 0-d
    ones); call after each backward. A no-op for unsharded models and single processes."""
    params = getattr(model, "_replicated_parameters", ())
    if not params or not is_distributed():
        return
    for p in params:
        grad = p.grad if p.grad is not None else torch.zeros_like(p)  # every rank joins the all_reduce
        dist.all_reduce(grad)
        p.grad = grad / dist.get_world_size()


def data_parallel_mesh(mesh):
    """The data-parallel dimension of Lightning's ``ModelParallelStrategy`` mesh; a clear
    error when tensor parallelism was asked for (vlzoo shards, it does not split layers)."""
    names = mesh.mesh_dim_names or ()
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
        raise ValueError(
            f"ModelParallelStrategy built a tensor-parallel mesh of size {mesh['tensor_parallel'].size()}; vlzoo "
            "shards with FSDP over data parallelism only. Use --trainer.strategy fsdp2 (vlzoo.parallel.FSDP2Strategy), "
            "or set data_parallel_size to the number of processes and tensor_parallel_size: 1")
    return mesh["data_parallel"] if "data_parallel" in names else mesh


# ------------------------------------------------------------------- strategies
class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` as vlzoo uses it: a data-parallel mesh over
    every process (FSDP across all devices and nodes) and the :class:`FSDPOptions`.

    Args:
        activation_checkpointing, param_dtype, reshard_after_forward: see :class:`FSDPOptions`.
        save_distributed_checkpoint: True writes sharded checkpoint folders (each rank its
            shard); False gathers one full checkpoint file on rank 0.
    """

    def __init__(
        self,
        activation_checkpointing: bool = False,
        param_dtype: str | None = None,
        reshard_after_forward: bool = True,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        **kwargs: Any,
    ):
        kwargs.setdefault("tensor_parallel_size", 1)
        super().__init__(save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, **kwargs)
        self.fsdp_options = FSDPOptions(activation_checkpointing, param_dtype, reshard_after_forward)

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        """Sharded checkpoints are written to ``PATH.partial`` and renamed into place once
        every rank has written its shard, so an interrupted save never leaves a mixed
        folder at PATH (full checkpoints go through vlzoo's atomic file writer)."""
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        staging, old = path.with_name(path.name + ".partial"), path.with_name(path.name + ".old")
        if self.global_rank == 0 and staging.exists():
            shutil.rmtree(staging)
        self.barrier()
        super().save_checkpoint(checkpoint, staging, storage_options)
        self.barrier()
        if self.global_rank == 0:
            if path.is_dir():
                path.rename(old)
            elif path.exists():
                path.unlink()
            staging.rename(path)
            if old.exists():
                shutil.rmtree(old)
        self.barrier()


def refuse_length_buckets(model: nn.Module, strategy: str) -> None:
    """A clear error for ``length_buckets > 1`` under sharding: each block gathers its
    weights once per call, and the number of length groups depends on each rank's own
    texts, so ranks would pair their gathers wrongly."""
    grouped = sorted({type(m).__name__ for m in model.modules() if getattr(m, "length_buckets", 1) > 1})
    if grouped:
        raise ValueError(f"text.length_buckets (or qformer.length_buckets) > 1 in {', '.join(grouped)} cannot run "
                         f"under {strategy}: the number of text-pass calls would differ between ranks; set it to 1 "
                         "(DDP and single-device runs support it)")


def fsdp1_wrap_policy(model: nn.Module):
    """A ``lambda_auto_wrap_policy`` for the classic ``FSDPStrategy`` (GPU only in
    Lightning): wraps the blocks and frozen parts that :func:`sharding_units` finds as
    single modules. Units that share parameters between modules (BLIP's encoder and
    decoder blocks) cannot be one FSDP1 unit, so they stay in their parent's."""
    from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

    refuse_length_buckets(model, "FSDP")

    block_units, other_units = sharding_units(model)
    single = {id(unit[0]) for unit in block_units + other_units if len(unit) == 1}
    return functools.partial(lambda_auto_wrap_policy, lambda_fn=lambda module: id(module) in single)


def register_strategies() -> None:
    """``--trainer.strategy fsdp2`` (and ``fsdp2_bf16``) by name."""
    from lightning.pytorch.strategies import StrategyRegistry

    if "fsdp2" not in StrategyRegistry:
        StrategyRegistry.register("fsdp2", FSDP2Strategy, description="vlzoo FSDP2 over all processes")
        StrategyRegistry.register("fsdp2_bf16", FSDP2Strategy, description="vlzoo FSDP2, bf16 parameters",
                                  param_dtype="bf16")
