"""Tiny model configs shared by tests (importable: pytest puts tests/ on the path)."""

from vlzoo.config import BLIP2Config, TextConfig, VisionConfig


def tiny_blip2_config(**overrides) -> BLIP2Config:
    return BLIP2Config(
        embed_dim=16, num_queries=4,
        vision=VisionConfig(impl="timm", name="vit_tiny_patch16_224", image_size=16, output_layer=-2,
                            kwargs=dict(patch_size=8, embed_dim=24, depth=2, num_heads=2)),
        qformer=TextConfig(impl="bert", tokenizer="shapes", context_length=24,
                           kwargs=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                       attention_probs_dropout_prob=0.0)),
        **overrides,
    )


def tiny_clip_config():
    from vlzoo.config import CLIPConfig

    return CLIPConfig(
        embed_dim=16,
        vision=VisionConfig(impl="timm", name="vit_tiny_patch16_224", image_size=16, mean=(0.5,) * 3, std=(0.5,) * 3,
                            kwargs=dict(patch_size=8, embed_dim=24, depth=1, num_heads=2)),
        text=TextConfig(impl="open_clip", tokenizer="shapes", context_length=24, kwargs=dict(width=32, heads=2, layers=1)),
    )


def tiny_momentum_config(schema, **overrides):
    return schema(
        embed_dim=16, queue_size=32,
        vision=VisionConfig(impl="timm", name="vit_tiny_patch16_224", image_size=16, mean=(0.5,) * 3, std=(0.5,) * 3,
                            kwargs=dict(patch_size=8, embed_dim=24, depth=1, num_heads=2)),
        text=TextConfig(impl="bert", tokenizer="shapes", context_length=24,
                        kwargs=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                    max_position_embeddings=32)),
        **overrides,
    )


def tiny_task(family: str):
    """An untrained task of ``family`` (clip, albef, blip, blip2) at tiny sizes."""
    from vlzoo.config import ALBEFConfig, BLIPConfig
    from vlzoo.models.generation import GenerationConfig
    from vlzoo.tasks import ALBEFTask, BLIP2Task, BLIPTask, CLIPTask

    greedy = GenerationConfig(method="greedy", max_length=6, min_length=1)
    if family == "clip":
        return CLIPTask(tiny_clip_config())
    if family == "albef":
        return ALBEFTask(tiny_momentum_config(ALBEFConfig, fusion_layers=1))
    if family == "blip":
        return BLIPTask(tiny_momentum_config(BLIPConfig), generation=greedy)
    if family == "blip2":
        return BLIP2Task(tiny_blip2_config(), generation=greedy)
    raise ValueError(family)


def save_task_checkpoint(task, path):
    """A checkpoint as ``vlzoo fit`` writes it (hyper-parameters, state dict, task class),
    without training."""
    import torch

    cls = type(task)
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams),
                "vlzoo_task": f"{cls.__module__}.{cls.__qualname__}", "pytorch-lightning_version": "2.6.0"}, path)
    return path
