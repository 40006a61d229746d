"""A counter of reads of a tensor's value back into Python, for tests of sync-free code
(importable: pytest puts tests/ on the path)."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class HostReads(TorchDispatchMode):
    """Counts reads of a tensor's value into Python (``int(t)``, ``t.item()``, ``bool(t)``):
    on a GPU each is a host synchronisation. ``.tolist()`` does not pass through the op it
    watches on a CPU, so a count of 0 is necessary, not sufficient."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.reads += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))
