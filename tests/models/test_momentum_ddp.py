"""Two gloo processes: identical queues equal to one process on the union batch, and
ITM hard negatives drawn from the other rank too."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vlzoo.config import ALBEFConfig, BLIPConfig, TextConfig, VisionConfig
from vlzoo.models import itm as itm_module
from vlzoo.models.builders import build_albef, build_blip

UNION, STEPS = 8, 3


def tiny(family: str):
    torch.manual_seed(0)
    common = dict(
        embed_dim=16, queue_size=UNION * 4,
        vision=VisionConfig(impl="timm", name="vit_tiny_patch16_224", image_size=16,
                            kwargs=dict(patch_size=8, embed_dim=24, depth=1, num_heads=2)),
        text=TextConfig(impl="bert", tokenizer="shapes", context_length=24,
                        kwargs=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                    max_position_embeddings=32, hidden_dropout_prob=0.0,
                                    attention_probs_dropout_prob=0.0)),
    )
    if family == "albef":
        return build_albef(ALBEFConfig(fusion_layers=1, **common))
    return build_blip(BLIPConfig(**common))


def union_batch(tokenizer, step: int):
    g = torch.Generator().manual_seed(step)
    words = ["red circle", "small blue square", "green star above a purple cross", "yellow triangle"]
    texts = [f"a {words[(i + step) % 4]}" + " left of a diamond" * (i % 3) for i in range(UNION)]
    return torch.randn(UNION, 3, 16, 16, generator=g), tokenizer(texts), torch.arange(UNION) + 100 * step


def _worker(rank: int, family: str, init_file: str, out_dir: str, micro_batches: int = 1):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    model, tok = tiny(family)
    model.micro_batches = micro_batches
    drawn = []
    sampler = itm_module.sample_hard_negatives

    def recording(similarity, positive, generator=None):
        picks = sampler(similarity, positive, generator)
        drawn.append((similarity.shape[1], picks))
        return picks

    itm_module.sample_hard_negatives = recording
    torch.manual_seed(rank)
    half = slice(rank * UNION // 2, (rank + 1) * UNION // 2)
    for step in range(STEPS):
        images, tokens, index = union_batch(tok, step)
        ids, mask = tokens["input_ids"][half], tokens["attention_mask"][half]
        ids, mask = ids[:, : int(mask.sum(1).max())], mask[:, : int(mask.sum(1).max())]  # ranks differ in length
        out = model(images[half], ids, mask, index[half])
        out.loss.backward()
        model.momentum_update()
        model.enqueue(out.image_feat_m, out.text_feat_m, out.index)
    torch.save({"queue": dict(model.queue.named_buffers()), "drawn": drawn}, os.path.join(out_dir, f"r{rank}.pt"))
    dist.destroy_process_group()


def _check(family: str, tmp_path, micro_batches: int = 1):
    mp.spawn(_worker, args=(family, str(tmp_path / "init"), str(tmp_path), micro_batches), nprocs=2, join=True)
    model, tok = tiny(family)
    for step in range(STEPS):
        images, tokens, index = union_batch(tok, step)
        out = model(images, tokens["input_ids"], tokens["attention_mask"], index)
        model.enqueue(out.image_feat_m, out.text_feat_m, out.index)
    results = [torch.load(tmp_path / f"r{r}.pt", weights_only=True) for r in range(2)]
    for name, reference in model.queue.named_buffers():
        torch.testing.assert_close(results[0]["queue"][name], results[1]["queue"][name], atol=0, rtol=0)
        torch.testing.assert_close(results[0]["queue"][name], reference, atol=1e-5, rtol=1e-4, msg=name)
    assert int(model.queue.ptr) == (STEPS * UNION) % (UNION * 4)
    for rank, result in enumerate(results):
        other = range((1 - rank) * UNION // 2, (2 - rank) * UNION // 2)
        assert all(n == UNION for n, _ in result["drawn"])  # candidates: the batches of both ranks
        picks = torch.cat([p for _, p in result["drawn"]]).tolist()
        assert any(p in other for p in picks), f"rank {rank} never drew a negative from the other rank"


def test_albef_two_ranks_in_micro_batches_share_queue_and_negatives(tmp_path):
    """Each rank in 2 feature-cached parts (optim.micro_batches) against one process on the
    union batch at once."""
    _check("albef", tmp_path, micro_batches=2)


def test_blip_two_ranks_share_queue_and_negatives(tmp_path):
    _check("blip", tmp_path)

