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
