"""Character-level language-model data: the CPython documentation topics (PSF License / 0BSD)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..errors import NmgradError
from .batches import Batches, Data
from .paths import data_file

TEXT_FILE = "pydoc_topics.txt"
VAL_FRACTION = 0.1
"""The last 10% of the characters are the validation split."""


@dataclass(frozen=True)
class CharVocab:
    """The sorted set of characters of the whole corpus; token id = index in ``chars``."""

    chars: str

    @property
    def size(self) -> int:
        return len(self.chars)

    def encode(self, s: str) -> torch.Tensor:
        index = {c: i for i, c in enumerate(self.chars)}
        return torch.tensor([index[c] for c in s], dtype=torch.long)

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)


def load_corpus(data_dir: str | os.PathLike | None = None) -> tuple[torch.Tensor, CharVocab]:
    """(token ids int64 [n_chars], vocab) of the whole corpus."""
    s = data_file(TEXT_FILE, data_dir).read_text(encoding="utf-8")
    vocab = CharVocab("".join(sorted(set(s))))
    return vocab.encode(s), vocab


def text(
    split: str = "train",
    block_size: int = 64,
    batch_size: int = 32,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
) -> Batches:
    """Batches ``(x, y)`` of int64 [B, T] token ids with ``y`` = ``x`` shifted by one character.

    ``train``: each epoch is ``n_train // (B * T)`` batches of windows at random offsets (from
    ``seed``); ``val``: consecutive non-overlapping windows of the last 10%, fixed. ``.vocab`` is
    the :class:`CharVocab`.
    """
    if split not in ("train", "val"):
        raise NmgradError(f"text split '{split}' is unknown: use train or val")
    if batch_size < 1 or block_size < 1:
        raise NmgradError(f"batch size and block size must be >= 1, got {batch_size} and {block_size}")
    ids, vocab = load_corpus(data_dir)
    cut = int(len(ids) * (1 - VAL_FRACTION))
    data = ids[:cut] if split == "train" else ids[cut:]
    n_windows = len(data) - block_size - 1
    if n_windows < 1:
        raise NmgradError(f"block size {block_size} is longer than the {split} text: use a smaller one")
    if split == "train":
        n_batches = max(1, len(data) // (batch_size * block_size))

        def epoch(_e: int, gen: torch.Generator):
            for _ in range(n_batches):
                starts = torch.randint(0, n_windows + 1, (batch_size,), generator=gen)
                pos = starts[:, None] + torch.arange(block_size + 1)  # (B, T+1)
                chunk = data[pos]
                yield chunk[:, :-1], chunk[:, 1:]

    else:
        starts = torch.arange(0, n_windows + 1, block_size)
        n_batches = -(-len(starts) // batch_size)

        def epoch(_e: int, _gen: torch.Generator):
            for s in range(0, len(starts), batch_size):
                pos = starts[s : s + batch_size, None] + torch.arange(block_size + 1)
                chunk = data[pos]
                yield chunk[:, :-1], chunk[:, 1:]

    out = Batches(epoch, n_batches, seed)
    out.vocab = vocab
    return out


def text_data(
    batch_size: int = 32, seed: int = 0, block_size: int = 64, data_dir: str | os.PathLike | None = None
) -> Data:
    """The built-in ``text`` data: train/val batches plus ``vocab_size`` and ``block_size``."""
    train = text("train", block_size, batch_size, seed, data_dir)
    return Data(
        train=train,
        eval=text("val", block_size, batch_size, seed, data_dir),
        info={"vocab_size": train.vocab.size, "block_size": block_size, "vocab": train.vocab},
    )
