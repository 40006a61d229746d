"""Fine-tuning tools shared by every task: start from pretrained weights, freeze parts,
layer-wise learning-rate decay, gradient checkpointing and LoRA adapters (``peft``),
merged back into plain weights for export.

A model's *parts* are its top-level children (``vision``, ``text``, ``qformer``,
``llm``, ``answer_decoder``, ...); a *tower* is a part with numbered blocks.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor, nn

from vlzoo.config import FinetuneConfig, LoRAConfig
from vlzoo.weights import load_strict

FREEZE_ALIASES = {"qformer": ("qformer.", "query_tokens")}
_BLOCK = re.compile(r"\.(?:blocks|layer|layers|resblocks|h)\.(\d+)\.")
_EMBEDDING_WORDS = ("embed", "cls_token", "class_embedding", "positional", "pos_", "patch", "reg_token", "conv1",
                    "ln_pre", "norm_pre")  # the stem: patch/token embedding and the norm before the blocks


def part_of(name: str) -> str:
    """The part a parameter belongs to: the first component of its name."""
    return name.split(".", 1)[0]


def freeze_parts(model: nn.Module, entries: list[str]) -> int:
    """``requires_grad = False`` for parameters under each entry (a part name or a name
    prefix); returns how many tensors were frozen. An entry that matches nothing is an
    error naming the model's parts."""
    names = [n for n, _ in model.named_parameters()]
    frozen = 0
    for entry in entries:
        prefixes = FREEZE_ALIASES.get(entry, (entry if entry.endswith(".") else f"{entry}.", ))
        matched = [n for n in names if n.startswith(prefixes) or n == entry]
        if not matched:
            parts = sorted({part_of(n) for n in names})
            raise ValueError(f"finetune.freeze: {entry!r} matches no parameter of {type(model).__name__} "
                             f"(its parts: {', '.join(parts)})")
        params = dict(model.named_parameters())
        for n in matched:
            params[n].requires_grad_(False)
        frozen += len(matched)
    return frozen


def layer_scales(model: nn.Module, decay: float) -> dict[str, float]:
    """Learning-rate multiplier of every parameter under layer-wise decay: block i of a
    tower with L blocks gets ``decay ** (L - i)``, its embeddings ``decay ** (L + 1)``,
    everything else (final norms, projections, heads) 1."""
    names = [n for n, _ in model.named_parameters()]
    if decay == 1.0:
        return dict.fromkeys(names, 1.0)
    if not 0 < decay <= 1:
        raise ValueError(f"finetune.layer_decay must be in (0, 1], got {decay}")
    depth: dict[str, int] = {}
    for n in names:
        if match := _BLOCK.search(n):
            depth[part_of(n)] = max(depth.get(part_of(n), 0), int(match.group(1)) + 1)
    scales = {}
    for n in names:
        tower_depth = depth.get(part_of(n))
        match = _BLOCK.search(n)
        if tower_depth is None:
            scales[n] = 1.0
        elif match:
            scales[n] = decay ** (tower_depth - int(match.group(1)))
        elif any(w in n.rsplit(".", 1)[0].lower() or w in n.lower() for w in _EMBEDDING_WORDS):
            scales[n] = decay ** (tower_depth + 1)
        else:
            scales[n] = 1.0
    return scales


def enable_grad_checkpointing(model: nn.Module) -> int:
    """Turn on activation checkpointing in every backbone that supports it (vlzoo
    encoders, transformers models); returns how many modules took it."""
    done = 0
    for module in model.children():
        if hasattr(module, "set_grad_checkpointing"):
            try:
                module.set_grad_checkpointing(True)
                done += 1
            except NotImplementedError:
                pass
        elif hasattr(module, "gradient_checkpointing_enable") and getattr(module, "supports_gradient_checkpointing",
                                                                          False):
            module.gradient_checkpointing_enable()
            done += 1
        else:
            done += enable_grad_checkpointing(module)
    return done


# ---------------------------------------------------------------------- LoRA
def has_lora(model: nn.Module) -> bool:
    return any("lora_" in n for n, _ in model.named_parameters())


def add_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """LoRA adapters on the linear layers of ``cfg.parts`` whose names end with one of
    ``cfg.targets``; the base weights of those parts stop training, other parameters
    keep their ``requires_grad``. Returns the adapted module names."""
    from peft import LoraConfig, inject_adapter_in_model

    if cfg.rank <= 0:
        raise ValueError(f"finetune.lora.rank must be positive to add adapters, got {cfg.rank}")
    if hasattr(model, "momentum_update"):
        raise ValueError(f"finetune.lora: {type(model).__name__} keeps momentum (EMA) copies of its encoders, which "
                         "LoRA adapters would not follow; fine-tune ALBEF/BLIP fully (with finetune.freeze or "
                         "layer_decay) instead")
    present = [p for p in cfg.parts if hasattr(model, p)]
    pattern = rf"^(?:{'|'.join(map(re.escape, present))})\..*\.(?:{'|'.join(map(re.escape, cfg.targets))})$"
    targets = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and re.match(pattern, n)]
    if not targets:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)
                        and part_of(n) in present})
        raise ValueError(f"finetune.lora: no linear layer of parts {cfg.parts} ends with one of {cfg.targets} "
                         f"in {type(model).__name__} (its linear layers there end with: {', '.join(names)})")
    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    inject_adapter_in_model(LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                       target_modules=targets), model)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.requires_grad_(True)
        elif part_of(name) in present:
            p.requires_grad_(False)
        else:
            p.requires_grad_(trainable[name])  # outside the adapted parts names are unchanged
    return targets


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA adapter into its base layer and put the plain layer back, so the
    model has its original parameter names; returns how many layers were merged."""
    from peft.tuners.lora import LoraLayer

    merged = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
            merged += 1
    return merged


def base_layer_keys(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """A plain state dict renamed to a LoRA-adapted model's keys (``x.weight`` ->
    ``x.base_layer.weight`` where adapters sit)."""
    own = set(model.state_dict())
    renamed = {}
    for key, value in state.items():
        head, _, leaf = key.rpartition(".")
        adapted = f"{head}.base_layer.{leaf}"
        renamed[adapted if adapted in own and key not in own else key] = value
    return renamed


# ---------------------------------------------------------------------- applying a config
def prepare_model(model: nn.Module, cfg: FinetuneConfig) -> dict[str, Any]:
    """Apply ``cfg``'s structure to ``model``: LoRA adapters, then frozen parts, then
    gradient checkpointing. Returns what was done (for the log)."""
    done: dict[str, Any] = {}
    if cfg.lora.rank > 0 and not has_lora(model):
        done["lora_layers"] = len(add_lora(model, cfg.lora))
    if cfg.freeze:
        done["frozen_tensors"] = freeze_parts(model, list(cfg.freeze))
    if cfg.grad_checkpointing:
        done["grad_checkpointing"] = enable_grad_checkpointing(model)
    return done


def trainable_summary(model: nn.Module) -> str:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"{trainable:,} of {total:,} parameters train ({100 * trainable / max(1, total):.1f}%)"


@torch.no_grad()
def load_initial_weights(model: nn.Module, state: dict[str, Tensor], source: str,
                         allow_missing: tuple[str, ...] = ()) -> None:
    """Strictly load ``state`` (a plain state dict) into ``model``, which may carry LoRA
    adapters (their weights stay as initialised)."""

    if has_lora(model):
        state = base_layer_keys(state, model)
        allow_missing = (*allow_missing, "lora_")
    load_strict(model, state, source, allow_missing=allow_missing)
