"""Model and data for the torchrun capture tests (tests/test_capture_dist.py).

``data`` cuts the same global batches whatever the number of processes: ``batch_size * world_size``
rows per step, rank r taking rows ``[r*batch_size, (r+1)*batch_size)``. So 2 ranks at batch size B
train on exactly what 1 process sees at batch size 2B. ``NMGRAD_TEST_KILL_RANK=r:k`` makes rank r
kill itself (SIGKILL) when it draws batch k: a rank that dies mid-run.
"""

from __future__ import annotations

import os
import signal

import torch
from torch import nn

IN, HIDDEN, CLASSES, BATCHES = 8, 16, 4, 6


def model() -> nn.Module:
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES))


class _Shard:
    def __init__(self, rank: int, world_size: int, batch_size: int):
        gen = torch.Generator().manual_seed(7)
        rows = batch_size * world_size
        self.batches = [
            (torch.randn(rows, IN, generator=gen), torch.randint(0, CLASSES, (rows,), generator=gen))
            for _ in range(BATCHES)
        ]
        self.rank, self.lo, self.hi = rank, rank * batch_size, (rank + 1) * batch_size
        kill = os.environ.get("NMGRAD_TEST_KILL_RANK")
        self.kill_at = int(kill.split(":")[1]) if kill and int(kill.split(":")[0]) == rank else None

    def __iter__(self):
        for k, (x, y) in enumerate(self.batches):
            if k == self.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            yield x[self.lo:self.hi], y[self.lo:self.hi]


def data(rank: int = 0, world_size: int = 1, batch_size: int = 4) -> _Shard:
    return _Shard(rank, world_size, batch_size)
