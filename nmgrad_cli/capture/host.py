"""Copies of the recorded tensors to the host, for the capture's writer thread: :class:`HostCopies`.

CPU tensors get a plain copy (autograd may reuse the buffer, and the writer reads it later on its own
thread). CUDA tensors are first cloned on the compute stream (the source stays autograd's to reuse or
rewrite), then copied into pinned host memory on a side stream with ``non_blocking=True``, and one
event is recorded per record. The copy runs on the copy engine while the GPU goes on with the backward
and the next step; the training thread never waits for it. The writer thread waits on the record's
event (:meth:`StreamWriter.write`'s ``ready``) before it reads the bytes.
"""

from __future__ import annotations

import torch


def owned_copy(t: torch.Tensor) -> torch.Tensor:
    """A host copy of ``t`` that is ready when returned (synchronous from a GPU)."""
    return t.detach().to("cpu", copy=True)


class HostCopies:
    """``copy(t)`` -> a host tensor holding ``t``'s values once ``ready(host)`` (None: already)."""

    def __init__(self):
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._ready: dict[int, torch.cuda.Event] = {}
        """data_ptr of a pinned host tensor whose copy is in flight -> its event."""

    def copy(self, t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "cuda" or t.numel() == 0:
            return owned_copy(t)
        src = t.detach().clone(memory_format=torch.contiguous_format)  # (compute stream) ours, not autograd's
        side = self._side(t.device)
        side.wait_stream(torch.cuda.current_stream(t.device))  # the clone is done before the copy
        host = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
        with torch.cuda.stream(side):
            host.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(side)
        src.record_stream(side)  # its memory is not reused before the copy is done
        self._ready[host.data_ptr()] = event
        return host

    def ready(self, host: torch.Tensor) -> torch.cuda.Event | None:
        """The event to wait on before reading ``host`` (once: it is forgotten here), or None."""
        return self._ready.pop(host.data_ptr(), None) if host.numel() else None

    def forget(self) -> None:
        """Drop the events of copies that will not be written (a stopped step)."""
        self._ready.clear()

    def _side(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]
