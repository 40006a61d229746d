"""Data: the embedded shapes dataset, tokenizers, transforms, the DataModule."""

from vlzoo.data.datamodule import EvalAnnotations, ShapesConfig, VLDataModule

__all__ = ["VLDataModule", "ShapesConfig", "EvalAnnotations"]
