"""UCI optdigits 8x8 handwritten digits (the copy scikit-learn bundles; CC BY 4.0)."""

from __future__ import annotations

import os

import numpy as np
import torch

from ..errors import NmgradError
from .batches import Batches, Data
from .paths import data_file

DIGITS_FILE = "digits.npz"
N_TEST = 297
"""The last 297 images of a fixed permutation (seed 0) are the test split; the other 1500 train."""


def load_digits_arrays(data_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [1797, 8, 8] in 0..16, labels int64 [1797]) as stored."""
    path = data_file(DIGITS_FILE, data_dir)
    try:
        with np.load(path) as z:
            images, labels = z["images"], z["labels"].astype(np.int64)
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign file: np.load raises many kinds
        lines = str(exc).strip().splitlines()
        why = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
        raise NmgradError(
            f"{path} is not a valid digits file ({why}): restore it from the repository's sample_data/"
        ) from None
    if images.ndim != 3 or images.shape[1:] != (8, 8) or labels.shape != images.shape[:1]:
        raise NmgradError(
            f"{path} holds images {images.shape} and labels {labels.shape}, not [N, 8, 8] and [N]: restore it from "
            "the repository's sample_data/"
        )
    return images, labels


def digits(
    split: str = "train", batch_size: int = 64, seed: int = 0, data_dir: str | os.PathLike | None = None
) -> Batches:
    """Batches ``(x, y)`` of digits: x float32 [B, 1, 8, 8] = pixel / 16, y int64 [B] in 0..9.

    ``split``: ``train`` (1500 images, reshuffled every epoch from ``seed``, last partial batch
    dropped) or ``test`` (297 images, fixed order, every image once).
    """
    if split not in ("train", "test"):
        raise NmgradError(f"digits split '{split}' is unknown: use train or test")
    if batch_size < 1:
        raise NmgradError(f"batch size must be >= 1, got {batch_size}")
    images, labels = load_digits_arrays(data_dir)
    perm = np.random.default_rng(0).permutation(len(images))
    idx = perm[:-N_TEST] if split == "train" else perm[-N_TEST:]
    x = torch.from_numpy(images[idx].astype(np.float32) / 16.0).unsqueeze(1)  # (B, 1, 8, 8)
    y = torch.from_numpy(labels[idx])
    n = len(idx)
    if split == "train":
        batch_size = min(batch_size, n)
        n_batches = n // batch_size

        def epoch(_e: int, gen: torch.Generator):
            order = torch.randperm(n, generator=gen)
            for b in range(n_batches):
                sel = order[b * batch_size : (b + 1) * batch_size]
                yield x[sel], y[sel]

        return Batches(epoch, n_batches, seed)

    def test_epoch(_e: int, _gen: torch.Generator):
        for s in range(0, n, batch_size):
            yield x[s : s + batch_size], y[s : s + batch_size]

    return Batches(test_epoch, -(-n // batch_size), seed)


def digits_data(batch_size: int = 64, seed: int = 0, data_dir: str | os.PathLike | None = None) -> Data:
    """The built-in ``digits`` data: train and test batches plus ``n_classes=10, in_shape=(1, 8, 8)``."""
    return Data(
        train=digits("train", batch_size, seed, data_dir),
        eval=digits("test", batch_size, seed, data_dir),
        info={"n_classes": 10, "in_shape": (1, 8, 8)},
    )
