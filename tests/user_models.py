"""Models, data and losses that the tests load through the ``package.module:attr`` import path.

``encoder`` is torch's own ``nn.TransformerEncoder`` (nobody here wrote it): MultiheadAttention with a
packed in_proj parameter and an out_proj that the module never calls.
"""

from __future__ import annotations

import torch
from torch import nn

VOCAB, DIM, SEQ = 17, 16, 6


class Encoder(nn.Module):
    def __init__(self, layers: int = 2):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        layer = nn.TransformerEncoderLayer(DIM, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.emb(idx)))  # (B, T, VOCAB)


def encoder() -> nn.Module:
    return Encoder()


def tokens(batch_size: int = 4, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed list of (ids, next ids) batches: predict (token + 1) mod VOCAB."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(8):
        x = torch.randint(0, VOCAB, (batch_size, SEQ), generator=g)
        out.append((x, (x + 1) % VOCAB))
    return out


def raising_factory() -> nn.Module:
    raise ValueError("bad hyper-parameter: width must be even\nsecond line")


def not_a_module() -> int:
    return 3


def one_shot_data():
    """A generator: used up after one epoch (the capture must say so instead of looping)."""
    yield torch.zeros(2, SEQ, dtype=torch.long), torch.zeros(2, SEQ, dtype=torch.long)


def no_layers() -> nn.Module:
    return nn.Sequential(nn.Embedding(VOCAB, VOCAB))  # trains, but has no GEMM


def vector_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return output.sum(-1).flatten()


def triple_batches(batch_size: int = 4, seed: int = 0):
    return [(torch.zeros(2, SEQ, dtype=torch.long),) * 3]


def wrong_shape_batches(batch_size: int = 4, seed: int = 0):
    return [(torch.zeros(2, 3, 8, 8), torch.zeros(2, dtype=torch.long))]


NOT_CALLABLE = 5


def classify_batches(batch_size: int = 4, seed: int = 0):
    """Dict batches (Hugging Face style) for sequence classification: 3 classes by the first token."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(4):
        ids = torch.randint(0, VOCAB, (batch_size, SEQ), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids[:, 0] % 3})
    return out


def unlabelled_batches(batch_size: int = 4, seed: int = 0):
    """Dict batches without labels: a Hugging Face model then returns no loss."""
    ids = torch.randint(0, VOCAB, (batch_size, SEQ), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
class _FailingLoader:
    """A re-iterable whose iterator raises after one batch, like a DataLoader whose worker dies."""

    def __iter__(self):
        yield torch.zeros(2, SEQ, dtype=torch.long), torch.zeros(2, SEQ, dtype=torch.long)
        raise OSError("disk read failed")


def raising_data(batch_size: int = 4, seed: int = 0):
    return _FailingLoader()


def frozen_encoder() -> nn.Module:
    return Encoder().requires_grad_(False)


class MobileBlock(nn.Module):
    """A MobileNet-style stack of stock convolutions: a full conv, a depthwise conv (groups = channels)
    and a grouped pointwise conv (groups = 2), then a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pointwise = nn.Conv2d(8, 8, 1, groups=2)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.pointwise(torch.relu(self.depthwise(x))))
        return self.head(x.mean((2, 3)))


def mobile_block() -> nn.Module:
    return MobileBlock()


def images(batch_size: int = 4, seed: int = 0):
    """(B, 1, 8, 8) images and 3 classes."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch_size, 1, 8, 8, generator=g), torch.randint(0, 3, (batch_size,), generator=g))
            for _ in range(4)]


class SameConv(nn.Module):
    """Issue 20's model: a conv with an even kernel and ``padding="same"`` (asymmetric padding)."""

    def __init__(self, n_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.same = nn.Conv2d(8, 8, 4, padding="same")
        self.head = nn.Linear(8, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.same(torch.relu(self.stem(x)))).mean((2, 3)))


def same_conv(n_classes: int = 10, **_info) -> nn.Module:
    return SameConv(n_classes)


class ComplexHead(nn.Module):
    """A complex-valued Linear (the sparse path prunes real tensors only: it runs dense, with a reason)."""

    def __init__(self, n_classes: int = 10):
        super().__init__()
        self.body = nn.Linear(64, 16)
        self.rot = nn.Linear(16, 16, dtype=torch.complex64)
        self.head = nn.Linear(16, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x.flatten(1)).to(torch.complex64)
        return self.head(self.rot(h).abs())


def complex_head(n_classes: int = 10, **_info) -> nn.Module:
    return ComplexHead(n_classes)
