"""Images for Hugging Face image classifiers (``--hf-task image-cls``): ``--data images:FOLDER``
(an ImageFolder-like layout) or the built-in ``digits`` resized.

``images:FOLDER`` holds one subfolder per class (sorted names are the label ids 0, 1, ...), each
with .png/.jpg/.jpeg files; they are read with Pillow (``pip install 'nmgrad[images]'``; matplotlib, the
``plot`` extra, brings it too), converted to the model's channels (L or RGB), resized to its
``image_size`` and scaled to [-1, 1] ((x / 255 - 0.5) / 0.5, the ViT image processor's default).
A fixed 10% (at least one image) is held out for evaluation.

Batches are dicts ``{pixel_values: (B, C, S, S) float32, labels: (B,) int64}``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import NmgradError
from .batches import Batches, Data
from .digits import digits

IMAGES_PREFIX = "images:"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
EVAL_FRACTION = 0.1


def _pillow():
    try:
        from PIL import Image
    except ImportError:
        raise NmgradError(
            "--data images:FOLDER reads images with Pillow, which is not installed: pip install 'nmgrad[images]'"
        ) from None
    return Image


def _scale(x: torch.Tensor) -> torch.Tensor:
    """Pixels in [0, 1] to [-1, 1]."""
    return (x - 0.5) / 0.5


def read_image_folder(spec: str, size: int, channels: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(images (N, channels, size, size) in [-1, 1], labels (N,), class names) of ``images:FOLDER``."""
    if channels not in (1, 3):
        raise NmgradError(f"--data {spec}: the model takes {channels} channels; images are read as 1 (L) or 3 (RGB)")
    root = Path(spec[len(IMAGES_PREFIX):]).expanduser()
    if not root.is_dir():
        raise NmgradError(f"--data {spec}: no folder {root}; give a folder with one subfolder of images per class")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files = [(f, i) for i, c in enumerate(classes) for f in sorted((root / c).iterdir())
             if f.suffix.lower() in IMAGE_SUFFIXES]
    if not classes or not files:
        raise NmgradError(
            f"--data {spec}: {root} has {len(classes)} class subfolders and no {'/'.join(IMAGE_SUFFIXES)} images in "
            "them: lay it out as FOLDER/<class>/<image>.png"
        )
    Image = _pillow()
    mode = "L" if channels == 1 else "RGB"
    arrays = []
    for f, _ in files:
        try:
            with Image.open(f) as im:
                arrays.append(np.asarray(im.convert(mode).resize((size, size), Image.BILINEAR), dtype=np.float32))
        except Exception as exc:  # noqa: BLE001 - PIL raises many kinds for a damaged or foreign file
            raise NmgradError(f"--data {spec}: cannot read {f} as an image ({type(exc).__name__}): remove or fix it"
                              ) from None
    x = torch.from_numpy(np.stack(arrays)) / 255.0  # (N, S, S) or (N, S, S, 3)
    x = x.unsqueeze(1) if channels == 1 else x.permute(0, 3, 1, 2)
    return _scale(x.contiguous()), torch.tensor([i for _, i in files], dtype=torch.long), classes


def image_folder_data(spec: str, batch_size: int, seed: int, size: int, channels: int) -> Data:
    """``images:FOLDER`` as dict batches: train (shuffled by ``seed`` each epoch) and eval (a fixed 10%)."""
    x, y, classes = read_image_folder(spec, size, channels)
    if len(x) < 2:
        raise NmgradError(f"--data {spec}: {len(x)} image: give at least 2 (one is held out for evaluation)")
    perm = torch.from_numpy(np.random.default_rng(0).permutation(len(x)))
    n_eval = max(1, int(len(x) * EVAL_FRACTION))
    tr, ev = perm[:-n_eval], perm[-n_eval:]
    bs = min(batch_size, len(tr))

    def train_epoch(_e: int, gen: torch.Generator):
        order = tr[torch.randperm(len(tr), generator=gen)]
        for s in range(0, len(order) - bs + 1, bs):
            yield {"pixel_values": x[order[s:s + bs]], "labels": y[order[s:s + bs]]}

    def eval_epoch(_e: int, _gen: torch.Generator):
        for s in range(0, len(ev), bs):
            yield {"pixel_values": x[ev[s:s + bs]], "labels": y[ev[s:s + bs]]}

    info = {"n_classes": len(classes), "classes": classes, "image_size": size, "channels": channels,
            "images": len(x), "image_folder": os.fspath(spec[len(IMAGES_PREFIX):])}
    return Data(train=Batches(train_epoch, len(tr) // bs, seed), eval=Batches(eval_epoch, -(-len(ev) // bs), seed),
                info=info)


def resized_digits_data(
    batch_size: int, seed: int, size: int, channels: int, data_dir: str | os.PathLike | None = None
) -> Data:
    """The built-in digits (same split) as dict batches of ``size`` x ``size`` images with ``channels``
    channels (the gray one repeated), bilinear, in [-1, 1]."""

    def resize(batch):
        x, y = batch  # (B, 1, 8, 8) in [0, 1]
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return {"pixel_values": _scale(x.expand(-1, channels, -1, -1).contiguous()), "labels": y}

    return Data(
        train=digits("train", batch_size, seed, data_dir).map(resize),
        eval=digits("test", batch_size, seed, data_dir).map(resize),
        info={"n_classes": 10, "image_size": size, "channels": channels, "resized_from": (8, 8)},
    )
