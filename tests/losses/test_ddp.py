"""Two gloo processes on CPU give the union-batch loss and gradients of one process."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from vlzoo.config import CLIPConfig, TextConfig, VisionConfig
from vlzoo.losses import clip_loss, siglip_loss
from vlzoo.models.builders import build_clip

BATCH = 8  # union batch; 4 per rank


def tiny_clip(loss: str):
    torch.manual_seed(0)
    cfg = CLIPConfig(
        embed_dim=16, loss=loss,
        vision=VisionConfig(impl="timm", name="vit_tiny_patch16_224", image_size=16,
                            kwargs=dict(patch_size=8, embed_dim=16, depth=1, num_heads=2)),
        text=TextConfig(impl="open_clip", tokenizer="shapes", context_length=16,
                        kwargs=dict(width=16, heads=2, layers=1)),
    )
    return build_clip(cfg)


def union_batch(tokenizer):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(BATCH, 3, 16, 16, generator=g)
    words = ["a large red circle", "a small blue square", "there is a green star", "a small purple cross"]
    texts = [f"{words[i % 4]} above a {['red', 'blue'][i % 2]} diamond" for i in range(BATCH)]
    return images, tokenizer(texts)


def loss_of(model, images, tokens, loss):
    out = model(images, tokens["input_ids"], tokens["attention_mask"])
    if loss == "siglip":
        return siglip_loss(out.image_embeds, out.text_embeds, out.logit_scale, out.logit_bias)
    return clip_loss(out.image_embeds, out.text_embeds, out.logit_scale)


def _worker(rank: int, world: int, init_file: str, out_dir: str, loss: str, micro_batches: int = 1):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model, tok = tiny_clip(loss)
    model.micro_batches = micro_batches  # feature-cached: one DDP backward, whatever the parts
    ddp = DistributedDataParallel(model)
    images, tokens = union_batch(tok)
    part = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    local_tokens = {k: v[part] for k, v in tokens.items()}
    value = loss_of(ddp, images[part], local_tokens, loss)
    value.backward()
    mean_loss = value.detach().clone()
    dist.all_reduce(mean_loss)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    torch.save({"loss": mean_loss / world, "grads": grads}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize(("loss", "micro_batches"), [("infonce", 1), ("infonce", 2), ("siglip", 3)])
def test_two_process_ddp_equals_union_batch(tmp_path, loss, micro_batches):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path), loss, micro_batches), nprocs=2, join=True)
    model, tok = tiny_clip(loss)
    images, tokens = union_batch(tok)
    reference = loss_of(model, images, tokens, loss)
    reference.backward()
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(result["loss"], reference.detach(), atol=1e-5, rtol=1e-5)
        for name, p in model.named_parameters():
            if p.grad is None:
                continue
            # float32 sums in another order: 1e-5 absolute, or 1e-4 relative on large gradients
            torch.testing.assert_close(result["grads"][name], p.grad, atol=1e-5, rtol=1e-4, msg=name)
