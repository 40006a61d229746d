"""``python -m vlzoo.hub.pretrained CHECKPOINT OUT``: write the Hugging Face form of a
task checkpoint whose task has one (``export_pretrained``, e.g. the shapes causal LM);
nothing for other tasks. Run by :mod:`vlzoo.artefacts` after it trains an artefact."""

from __future__ import annotations

import sys

from vlzoo.checkpoints import read_checkpoint
from vlzoo.families import load_task, task_class


def export_pretrained(checkpoint: str, out: str) -> bool:
    """Whether the checkpoint's task had a Hugging Face form (then written to ``out``)."""
    if not hasattr(task_class(read_checkpoint(checkpoint, mmap=True), checkpoint), "export_pretrained"):
        return False
    load_task(checkpoint).export_pretrained(out)
    return True


if __name__ == "__main__":
    export_pretrained(sys.argv[1], sys.argv[2])
