"""Samplers and loaders whose position survives a checkpoint, for exact resume.

Everything random about the data is a pure function of ``(seed, epoch, sample)``: the
order (a :class:`ResumableSampler`, the same permutation as ``DistributedSampler``
on one process or many), the caption drawn for an image, the substitute of a bad
sample. Nothing reads the global RNG, so restoring the model's RNG state and the
loader's position (``state_dict``: epoch and samples already consumed) replays an
interrupted run exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler


def draw(seed: int, epoch: int, index: int, count: int, salt: int = 0) -> int:
    """A uniform pick in ``[0, count)`` that depends only on its arguments."""
    return int(np.random.default_rng([seed, epoch, index, salt]).integers(count))


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` order (shuffled by ``seed + epoch``, split over replicas)
    that yields ``(epoch, index)`` keys and can start part-way into an epoch."""

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self._skip: tuple[int, int] | None = None  # (epoch, samples already consumed in it)

    def skip(self, samples: int) -> None:
        """Iterating this epoch again starts after ``samples`` of its samples. Applies
        to this epoch only: when the interrupted run had finished it (a checkpoint
        after its last batch), the trainer goes on with the next epoch, whole."""
        self._skip = (self.epoch, samples)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        start = self._skip[1] if self._skip is not None and self._skip[0] == self.epoch else 0
        self._skip = None
        indices = list(super().__iter__())[start:]
        return iter([(self.epoch, i) for i in indices])


class ResumableDataLoader(DataLoader):
    """A DataLoader Lightning saves and restores (it is ``_Stateful``): the data seed,
    the epoch and the number of samples this process consumed in it.

    ``consumed_batches`` reports how many batches of the current epoch were trained on
    (the Trainer's count; the loader itself runs ahead by its prefetch).
    """

    def __init__(self, *args: Any, consumed_batches: Callable[[], int] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.consumed_batches = consumed_batches

    def state_dict(self) -> dict[str, int]:
        batches = self.consumed_batches() if self.consumed_batches is not None else 0
        return {"epoch": int(self.sampler.epoch), "samples": int(batches * self.batch_size),
                "seed": int(self.sampler.seed)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if "seed" in state:  # the data order and draws of the interrupted run
            self.sampler.seed = state["seed"]
            if hasattr(self.dataset, "seed"):
                self.dataset.seed = state["seed"]
        self.sampler.set_epoch(state["epoch"])
        self.sampler.skip(state["samples"])


def private_generator(seed: int) -> torch.Generator:
    """For a DataLoader's worker base seed, so creating an iterator leaves the global RNG alone."""
    return torch.Generator().manual_seed(seed)
