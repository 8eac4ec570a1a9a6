"""Peak live tensor storage on the CPU, seen through a dispatch mode (a stand-in for torch.cuda's peak counter).

Depends on torch only, so the kvpress worker, which runs in another virtualenv, can load this file by path.
Buffers internal to fused kernels are invisible to it; every tensor an op returns is counted once per storage.
"""

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class PeakTensorMemory(TorchDispatchMode):
    """with PeakTensorMemory() as probe: ...; probe.peak is the most bytes alive at once inside the block."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self._seen:
                    self._seen.add(key)
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key, storage.nbytes())
        return out

    def _free(self, key, nbytes):
        self._seen.discard(key)
        self.live -= nbytes
