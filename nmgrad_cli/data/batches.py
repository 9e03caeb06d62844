"""Re-iterable batches and the infinite training stream built on them."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch

from ..errors import NmgradError


class Batches:
    """An iterable of ``(input, target)`` batches; each ``iter()`` is one epoch.

    ``make_epoch(epoch, generator)`` yields the batches of one epoch; the generator is seeded with
    ``seed + epoch`` so epoch ``e`` is the same whatever came before it. ``len()`` is batches per epoch.
    """

    def __init__(self, make_epoch: Callable[[int, torch.Generator], Iterator], n_batches: int, seed: int = 0):
        self._make_epoch = make_epoch
        self._n = n_batches
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return self._n

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        self.epoch += 1
        return iter(self._make_epoch(self.epoch - 1, gen))

    def map(self, fn: Callable) -> Batches:
        """The same epochs with ``fn`` applied to every batch (e.g. tuples made dicts)."""
        return Batches(lambda e, gen: map(fn, self._make_epoch(e, gen)), self._n, self.seed)


@dataclass
class Data:
    """What a data factory returns: training batches, optional evaluation batches, and facts the
    built-in models read (``n_classes``, ``in_shape``, ``vocab_size``, ``block_size``)."""

    train: Iterable
    eval: Iterable | None = None
    info: dict = field(default_factory=dict)


def cycle(batches: Iterable, what: str = "data") -> Iterator:
    """Iterate ``batches`` epoch after epoch, forever.

    Raises a one-line error if an epoch yields nothing (e.g. a generator that is already used up:
    return a list, a ``DataLoader`` or another re-iterable instead).
    """
    total = 0
    while True:
        n = 0
        for batch in _guarded(batches, what, total):
            n += 1
            yield batch
        total += n
        if n == 0:
            raise NmgradError(
                f"{what} yielded no batches" + (f" after {total}" if total else "")
                + ": return a re-iterable (a list or a DataLoader) of (input, target) batches, not a used-up iterator"
            )


def _guarded(batches: Iterable, what: str, done: int) -> Iterator:
    """``batches``, with an exception raised by the user's iterator turned into one line."""
    try:
        it = iter(batches)
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            yield batch
            done += 1
    except NmgradError:
        raise
    except Exception as exc:
        lines = str(exc).strip().splitlines()
        why = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
        raise NmgradError(f"{what} raised {why} after {done} batches: fix the data factory") from None
