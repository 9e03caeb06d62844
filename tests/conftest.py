"""Shared fixtures and the hardware markers (defined once here)."""

from __future__ import annotations

import pytest
import torch

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def gen() -> torch.Generator:
    """A fixed-seed CPU generator: every random test is reproducible."""
    return torch.Generator().manual_seed(1234)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny layers: on a busy 2-core box two threads spin-wait."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
