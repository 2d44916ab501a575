"""Pinned host memory, allocated once and counted exactly.

PyTorch's pinned allocator (``pin_memory=True``) rounds every request up to a
power of two and keeps freed blocks cached, so 26 GB of layers would pin 32 GB.
Here a plain CPU tensor of exactly the planned size is page-locked with
``cudaHostRegister`` and released with ``cudaHostUnregister`` when the memory is
closed. Copies from it to a GPU run at the link's full speed and asynchronously;
copies from pageable memory run at a fraction of it and block the host.
"""

from __future__ import annotations

import weakref

import torch

from ..errors import OffloadError


class PinnedMemory:
    """``nbytes`` bytes of host RAM (a uint8 tensor), page-locked when CUDA is present."""

    def __init__(self, nbytes: int, pin: bool | None = None):
        self.tensor = torch.empty(nbytes, dtype=torch.uint8)
        self.nbytes = nbytes
        pin = torch.cuda.is_available() if pin is None else pin
        self.pinned_bytes = 0
        if pin and self.nbytes:
            self.tensor.zero_()  # faults the pages in with all cores, faster than registration does it
            ptr = self.tensor.data_ptr()
            # 1: portable (pinned for every GPU); 2: mapped, so kernels may read it where it is (direct expert
            # reads); unified addressing maps it anyway, the flag makes sure
            err = torch.cuda.cudart().cudaHostRegister(ptr, self.nbytes, 1 | 2)
            if int(err) != 0:
                raise OffloadError(
                    f"could not pin {self.nbytes / 2**30:.2f} GiB of host memory (CUDA error {int(err)}); "
                    "lower --cpu-memory"
                )
            self.pinned_bytes = self.nbytes
            self._finalizer = weakref.finalize(self, _unregister, ptr, self.tensor)

    def close(self) -> None:
        finalizer = getattr(self, "_finalizer", None)
        if finalizer is not None:
            finalizer()
        self.pinned_bytes = 0


def _unregister(ptr: int, keep_alive: torch.Tensor) -> None:
    torch.cuda.synchronize()  # no copy may still be reading the memory
    torch.cuda.cudart().cudaHostUnregister(ptr)


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A short list from the host as a tensor on ``device``, without waiting for the GPU (:func:`on_device`)."""
    return on_device(torch.tensor(values, dtype=dtype), device)


def on_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on ``device``, without waiting for the GPU.

    A plain ``host.to(cuda)`` copies from pageable memory and blocks the host until the GPU
    has finished everything queued before it. Staged in pinned memory the copy is queued
    like a kernel; PyTorch's pinned allocator keeps the staging block until the copy has run.
    """
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def queued_copy(out: torch.Tensor, value: torch.Tensor) -> None:
    """``out.copy_(value)`` without waiting for the GPU: a small host ``value`` staged in pinned memory first, as
    :func:`on_device` stages it."""
    if out.is_cuda and value.device.type == "cpu" and not value.is_pinned():
        value = value.pin_memory()
    out.copy_(value, non_blocking=out.is_cuda)
