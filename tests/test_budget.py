"""The compute budget's FLOP count: attention is counted on CPU as on a GPU."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlzoo.budget import StepCostMeter, flop_counter_with_attention

B, H, L, S, D = 2, 3, 5, 7, 8  # batch, heads, query length, key length, head width


def qkv() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return (torch.randn(B, H, L, D, requires_grad=True), torch.randn(B, H, S, D, requires_grad=True),
            torch.randn(B, H, S, D, requires_grad=True))


def attention_by_hand(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.softmax(q @ k.transpose(-1, -2) / D**0.5, dim=-1) @ v


def test_cpu_attention_counts_the_same_as_attention_by_hand():
    counts = {}
    for name, attend in (("sdpa", F.scaled_dot_product_attention), ("by hand", attention_by_hand)):
        q, k, v = qkv()
        with flop_counter_with_attention() as counter:
            out = attend(q, k, v)
            forward = counter.get_total_flops()
            out.sum().backward()
        counts[name] = (forward, counter.get_total_flops() - forward)
    unit = B * H * L * S * D
    assert counts["sdpa"][0] == counts["by hand"][0] == 4 * unit  # QK^T and AV, 2 FLOPs a multiply-add
    assert counts["by hand"][1] == 8 * unit  # the gradients of both products' operands
    assert counts["sdpa"][1] == 10 * unit  # the same, and the scores QK^T recomputed (torch's CUDA formula)


def test_the_step_cost_meter_counts_attention():
    meter = StepCostMeter()
    meter.on_train_batch_start(None, None, None, 0)  # opens the counter of the first step
    q, k, v = qkv()
    F.scaled_dot_product_attention(q, k, v).sum().backward()
    meter.close()
    assert meter.flops == (4 + 10) * B * H * L * S * D  # forward and backward, as above
