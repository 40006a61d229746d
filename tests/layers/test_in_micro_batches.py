"""in_micro_batches: the whole batch's values and gradients, parts joined as documented,
and a backward that recomputes one micro-batch at a time."""

import pytest
import torch
from torch import nn

from vlzoo.layers.micro_batches import equal_parts, in_micro_batches


def test_sizes_cover_the_batch_evenly():
    assert equal_parts(10, 4) == [3, 3, 2, 2]
    assert equal_parts(3, 8) == [1, 1, 1]  # never an empty part
    assert equal_parts(5, 1) == [5]


@pytest.mark.parametrize("k", [1, 2, 3, 7])
def test_values_and_gradients_are_the_whole_batchs(k):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 4))
    x, w = torch.randn(7, 6), torch.randn(7, 4)

    def run(x, w, scale):
        out = net(x) * scale
        return out, (out * w).sum()  # (B, 4) and a 0-d sum over the rows

    def loss_and_grads(parts):
        net.zero_grad()
        out, total = in_micro_batches(run, parts, x, w, 2.0)
        loss = total + out.softmax(0).pow(2).sum()  # a term that couples the rows (as a contrastive loss does)
        loss.backward()
        return loss.detach(), out.detach(), [p.grad.clone() for p in net.parameters()]

    loss, out, grads = loss_and_grads(k)
    loss_1, out_1, grads_1 = loss_and_grads(1)
    torch.testing.assert_close(out, out_1, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(loss, loss_1, atol=1e-6, rtol=1e-6)
    for g, g_1 in zip(grads, grads_1, strict=True):
        torch.testing.assert_close(g, g_1, atol=1e-6, rtol=1e-5)


class Probe(torch.autograd.Function):
    """Identity that logs (forward/backward, tag, which part: its first input value)."""

    log: list[tuple[str, str, float]] = []

    @staticmethod
    def forward(ctx, x, tag, part):
        ctx.tag, ctx.part = tag, part
        Probe.log.append(("forward", tag, part))
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        Probe.log.append(("backward", ctx.tag, ctx.part))
        return grad, None, None


def test_backward_recomputes_one_micro_batch_at_a_time():
    torch.manual_seed(0)
    net = nn.Linear(3, 3)

    def run(x):
        part = float(x[0, 0].detach())
        return Probe.apply(net(Probe.apply(x, "in", part)), "out", part)

    x = torch.arange(18.0).reshape(6, 3).requires_grad_()
    Probe.log.clear()
    out = in_micro_batches(run, 3, x)
    assert [e[0] for e in Probe.log] == ["forward"] * 6
    Probe.log.clear()
    out.pow(2).sum().backward()
    parts = [e[2] for e in Probe.log]
    # the parts one after another, the newest first, never interleaved
    assert [parts[0], parts[len(parts) // 3], parts[-1]] == [12.0, 6.0, 0.0]
    for i in range(3):
        group = Probe.log[i * len(parts) // 3:(i + 1) * len(parts) // 3]
        assert {e[2] for e in group} == {group[0][2]}, Probe.log
        # within a part: its activations recomputed (the inner probe's forward) before the inner backward
        assert [e[:2] for e in group].index(("forward", "in")) < [e[:2] for e in group].index(("backward", "in"))
    plain = x.detach().requires_grad_()
    (net(plain) ** 2).sum().backward()
    torch.testing.assert_close(x.grad, plain.grad)


def test_dropout_draws_the_same_masks_when_recomputed():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.5), nn.Linear(16, 1))
    x = torch.randn(8, 4)
    torch.manual_seed(1)
    out = in_micro_batches(net, 4, x)
    out.sum().backward()
    grads = [p.grad.clone() for p in net.parameters()]
    # the same draws without checkpointing: the parts in turn from the same seed
    net.zero_grad()
    torch.manual_seed(1)
    plain = torch.cat([net(part) for part in x.split(2)])
    plain.sum().backward()
    torch.testing.assert_close(out, plain)
    for g, p in zip(grads, net.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad)


def test_tensors_of_different_lengths_are_a_clear_error():
    with pytest.raises(ValueError, match="leading dimension"):
        in_micro_batches(lambda a, b: a, 2, torch.zeros(4), torch.zeros(3))


def test_without_gradients_the_parts_are_plain_calls():
    calls = []

    def run(x):
        calls.append(len(x))
        return x * 2

    with torch.no_grad():
        out = in_micro_batches(run, 2, torch.ones(5, 2))
    assert calls == [3, 2] and out.shape == (5, 2)
