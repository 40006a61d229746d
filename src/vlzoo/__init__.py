"""vlzoo: a PyTorch Lightning model zoo for CLIP -> ALBEF -> BLIP -> BLIP-2.

From Python: ``vlzoo.list_models()``, ``vlzoo.create_model(name)``, ``vlzoo.load(ref)``.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # the zoo API, imported on first use (keeps ``import vlzoo`` light)
    if name == "list_models":  # reads the manifest only: no torch
        from vlzoo.hub.manifest import list_models

        return list_models
    if name in ("create_model", "load", "ZooModel"):
        from vlzoo import zoo

        return getattr(zoo, name)
    raise AttributeError(f"module 'vlzoo' has no attribute {name!r}")


__all__ = ["list_models", "create_model", "load", "ZooModel", "__version__"]
