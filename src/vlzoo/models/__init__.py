"""Plain ``nn.Module`` models composed from backbones passed in (no Lightning)."""

from vlzoo.models.albef import ALBEF
from vlzoo.models.blip import BLIP
from vlzoo.models.blip_vqa import BLIPVQA
from vlzoo.models.clip import CLIP, CLIPOutput
from vlzoo.models.momentum import FeatureQueue, MomentumModel, MomentumOutput

__all__ = ["CLIP", "CLIPOutput", "ALBEF", "BLIP", "BLIPVQA", "FeatureQueue", "MomentumModel", "MomentumOutput"]
