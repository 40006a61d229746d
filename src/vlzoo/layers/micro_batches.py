"""Feature-cached micro-batches: a big batch at the activation memory of a small one.

A contrastive loss needs every sample's features at once, so ordinary gradient
accumulation (k small batches, one optimizer step) changes the loss: each small batch
sees only its own negatives. Here the whole batch is loaded, and each per-sample pass
(an encoder, a fusion pass, a per-token loss) runs over ``k`` micro-batches under
activation checkpointing: the forward keeps only each micro-batch's inputs and outputs
(the features), the loss is computed over the whole batch's features, and the backward
recomputes one micro-batch at a time (autograd finishes the micro-batch created last
before it starts the next, since its nodes are newer). Loss and gradients are those of
the whole batch (exactly without dropout; with dropout each part draws its own masks,
the same in its recomputation; never with batch normalisation, which the tasks refuse);
the peak activation memory is one micro-batch's, plus the features. The cost is one more
forward of each part (of its no-gradient passes too where they sit inside the part,
e.g. ALBEF's momentum MLM targets). This is GradCache (Gao et al., 2021) and open_clip's
``--accum-freq``, as one autograd graph, so DDP reduces the gradients once, as for any
step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint


def equal_parts(rows: int, parts: int) -> list[int]:
    """``rows`` split into ``min(parts, rows)`` sizes differing by at most one (micro-batches
    here, length groups in :func:`vlzoo.layers.transformer.run_by_length`)."""
    k = max(1, min(parts, rows))
    return [rows // k + (i < rows % k) for i in range(k)]


def in_micro_batches(fn: Callable[..., Any], micro_batches: int, *args: Any) -> Any:
    """``fn(*args)`` computed over ``micro_batches`` slices of the leading dimension of
    every tensor argument (other arguments, and None, are passed to each call as they are).

    ``fn`` returns a tensor (B, ...), a 0-d tensor (a sum over its rows) or a tuple of
    those; the parts are concatenated along dim 0, and 0-d parts are added. Where
    gradients are enabled each call runs under non-reentrant activation checkpointing
    (the random state is restored for the recomputation, so dropout draws the same
    masks). ``micro_batches`` <= 1: one plain call.
    """
    tensors = [a for a in args if isinstance(a, Tensor)]
    if micro_batches <= 1 or not tensors:
        return fn(*args)
    batch = tensors[0].shape[0]
    if any(t.shape[0] != batch for t in tensors):
        raise ValueError(f"in_micro_batches: the tensor arguments differ in their leading dimension "
                         f"({[tuple(t.shape) for t in tensors]}); all must have the batch's {batch} rows")
    outputs, start = [], 0
    for size in equal_parts(batch, micro_batches):
        part = [a[start:start + size] if isinstance(a, Tensor) else a for a in args]
        outputs.append(checkpoint(fn, *part, use_reentrant=False) if torch.is_grad_enabled() else fn(*part))
        start += size
    return _joined(outputs)


def _joined(outputs: list[Any]) -> Any:
    first = outputs[0]
    if isinstance(first, tuple):
        return tuple(_joined([out[i] for out in outputs]) for i in range(len(first)))
    if first.ndim == 0:
        return torch.stack(outputs).sum()
    return torch.cat(outputs)
