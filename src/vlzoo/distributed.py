"""Process-group helpers that are no-ops in a single process."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for the local slice.

    Backward uses all_reduce (supported by gloo, NCCL and MPI alike), then keeps the
    caller's own rows.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.rank, ctx.batch = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.batch : (ctx.rank + 1) * ctx.batch]


def gather_with_grad(x: Tensor) -> Tensor:
    """(B, ...) per rank -> (world * B, ...), rank order, differentiable; identity alone."""
    if not is_distributed():
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def gather_no_grad(x: Tensor) -> Tensor:
    """(B, ...) per rank -> (world * B, ...) without gradient; identity alone."""
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def local_tensor(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (FSDP2 parameters and gradients); ``t`` otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t


def token_mean(total: Tensor, count: Tensor) -> Tensor:
    """``total`` (a sum over this rank's tokens) divided by the mean token count per rank.

    DDP and FSDP average gradients over ranks, so the average over ranks of this value
    is the sum over every rank's tokens divided by their number: the token mean of the
    union batch, however the tokens are spread over ranks. Alone: ``total / count``.
    Every rank must call it (one all_reduce of the count).
    """
    count = count.detach().float().reshape(1)
    if is_distributed():
        count = count.clone()
        dist.all_reduce(count)
        count = count / dist.get_world_size()
    return total / count.clamp(min=1).squeeze(0)


def gather_objects(obj: object) -> list[object]:
    """Every rank's ``obj``, in rank order; ``[obj]`` alone."""
    if not is_distributed():
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


@torch.no_grad()
def gather_padded(x: Tensor, value: int | float = 0) -> Tensor:
    """(B, L, ...) per rank, L may differ -> (world * B, max L, ...), padded with ``value``."""
    if not is_distributed():
        return x
    length = torch.tensor([x.shape[1]], device=x.device)
    longest = int(gather_no_grad(length).max())
    pad = x.new_full((x.shape[0], longest - x.shape[1], *x.shape[2:]), value)
    return gather_no_grad(torch.cat([x, pad], dim=1))
