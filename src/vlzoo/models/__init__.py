"""Plain ``nn.Module`` models composed from backbones passed in (no Lightning)."""

from vlzoo.models.clip import CLIP, CLIPOutput

__all__ = ["CLIP", "CLIPOutput"]
