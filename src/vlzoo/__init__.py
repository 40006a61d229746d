"""vlzoo: a PyTorch Lightning model zoo for CLIP -> ALBEF -> BLIP -> BLIP-2."""

__version__ = "0.1.0"
