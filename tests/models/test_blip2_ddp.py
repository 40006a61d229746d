"""BLIP-2 ITC over two gloo processes: in-batch negatives gathered from both ranks give
the loss and gradients of one process on the union batch."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tiny_configs import tiny_blip2_config
from torch.nn.parallel import DistributedDataParallel

from vlzoo.tasks.blip2 import build_resolved_blip2

BATCH = 8  # union batch; 4 per rank


def tiny():
    torch.manual_seed(0)
    model, tok, _ = build_resolved_blip2(tiny_blip2_config())
    return model, tok


def union_batch(tok):
    g = torch.Generator().manual_seed(1)
    words = ["a large red circle", "a small blue square", "a green star", "a small purple cross"]
    texts = [f"{words[i % 4]} above a {['red', 'blue'][i % 2]} diamond" for i in range(BATCH)]
    index = torch.tensor([0, 1, 2, 3, 4, 5, 0, 7])  # one image twice, on different ranks: two positives
    return torch.randn(BATCH, 3, 16, 16, generator=g), tok(texts), index


class ITC(torch.nn.Module):
    """The ITC loss as a module, so DDP can wrap it."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images, ids, mask, index):
        m = self.model
        return m.itc(m.query_features(m.image_tokens(images)), m.text_features(ids, mask), index)[0]


def _worker(rank: int, init_file: str, out_dir: str):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    model, tok = tiny()
    images, tokens, index = union_batch(tok)
    part = slice(rank * BATCH // 2, (rank + 1) * BATCH // 2)
    ddp = DistributedDataParallel(ITC(model), find_unused_parameters=True)
    loss = ddp(images[part], tokens["input_ids"][part], tokens["attention_mask"][part], index[part])
    loss.backward()
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    torch.save({"loss": mean / 2, "grads": grads}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_gathered_itc_equals_union_batch(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    model, tok = tiny()
    images, tokens, index = union_batch(tok)
    reference = ITC(model)(images, tokens["input_ids"], tokens["attention_mask"], index)
    reference.backward()
    assert model.qformer.query_tokens.grad.abs().sum() > 0
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(result["loss"], reference.detach(), atol=1e-5, rtol=1e-5)
        for name, p in model.named_parameters():
            if p.grad is not None:
                torch.testing.assert_close(result["grads"][name], p.grad, atol=1e-5, rtol=1e-4, msg=name)
