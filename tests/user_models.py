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


def partly_frozen_encoder() -> nn.Module:
    """A frozen embedding (the first layer's input needs no gradient) and a frozen head weight."""
    model = Encoder()
    model.emb.requires_grad_(False)
    model.head.weight.requires_grad_(False)
    return model


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


class ChannelsLastBlock(nn.Module):
    """Every site kind with X and W: a ConvNeXt-style block (depthwise Conv2d, then pointwise
    Linears on channels-last (B, H, W, C) activations, as in Hugging Face ConvNeXt), a Conv1d over
    the rows and a Conv3d over a stack of the channels."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw1 = nn.Linear(8, 16)  # on (B, H, W, 8)
        self.pw2 = nn.Linear(16, 8)
        self.rows = nn.Conv1d(8, 8, 3, padding=1, stride=2)
        self.vol = nn.Conv3d(1, 4, (2, 3, 3), padding=(0, 1, 1))
        self.head = nn.Linear(8 + 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dw(torch.relu(self.stem(x)))                       # (B, 8, 8, 8)
        x = x + self.pw2(torch.relu(self.pw1(x.permute(0, 2, 3, 1)))).permute(0, 3, 1, 2)
        r = torch.tanh(self.rows(x.mean(2)))                        # (B, 8, 4)
        v = torch.tanh(self.vol(x.unsqueeze(1)))                    # (B, 4, 7, 8, 8)
        return self.head(torch.cat([r.mean(-1), v.mean((2, 3, 4))], 1))


def channels_last_block() -> nn.Module:
    return ChannelsLastBlock()


class NotInterceptable(nn.Module):
    """Weights no GEMM site can take: a fused GRU and LSTM, an einsum, a parametrized Linear
    (torch.nn.utils.parametrize) and a weight used through W.t(); then a plain Linear head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.gru = nn.GRU(DIM, DIM, batch_first=True)
        self.lstm = nn.LSTM(DIM, DIM, batch_first=True)
        self.mix = nn.Parameter(torch.randn(DIM, DIM) / DIM**0.5)
        self.ortho = nn.utils.parametrizations.orthogonal(nn.Linear(DIM, DIM))
        self.tied = nn.Parameter(torch.randn(DIM, DIM) / DIM**0.5)
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x, _ = self.gru(self.emb(idx))
        x, _ = self.lstm(x)
        x = torch.einsum("btd,de->bte", x, self.mix)
        x = self.ortho(x) @ self.tied.t()
        return self.head(x)


def not_interceptable() -> nn.Module:
    return NotInterceptable()


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
