"""torchrun support: who am I, which device, and a process group for the duration of a run.

Under ``torchrun --nproc-per-node P`` every process runs the same command; ``RANK``, ``WORLD_SIZE``
and ``LOCAL_RANK`` come from the environment. The model is wrapped in DistributedDataParallel
(gloo on CPU, nccl on CUDA); pruning happens inside each rank's backward, before the gradient
all-reduce. Rank 0 writes the outputs.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import NmgradError, RankLostError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    """This process' rank (0 when not distributed)."""
    world_size: int = 1
    """Number of processes."""
    local_rank: int = 0
    """Rank on this machine (picks the GPU)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def dist_info() -> DistInfo:
    """Read the torchrun environment (a single process when it is absent)."""
    try:
        return DistInfo(
            int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
        )
    except ValueError as exc:
        raise NmgradError(f"bad torchrun environment (RANK/WORLD_SIZE/LOCAL_RANK): {exc}") from None


def resolve_device(spec: str, info: DistInfo) -> torch.device:
    """``auto`` -> cuda (this rank's GPU) if available, else cpu; ``cpu``; ``cuda``/``cuda:N``."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise NmgradError("--device cuda: no CUDA GPU is visible to torch; use --device cpu")
        if spec == "cuda":
            return torch.device("cuda", info.local_rank % torch.cuda.device_count())
        try:
            return torch.device(spec)
        except RuntimeError:
            raise NmgradError(f"--device '{spec}' is malformed: use auto, cpu, cuda or cuda:N") from None
    raise NmgradError(f"--device '{spec}' is unknown: use auto, cpu, cuda or cuda:N")


@contextlib.contextmanager
def process_group(info: DistInfo, device: torch.device):
    """Initialise the default process group when running distributed (and not yet initialised);
    destroy it on exit if this context created it."""
    created = False
    if info.enabled and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
        created = True
    try:
        yield
    finally:
        if created:
            dist.destroy_process_group()


def all_reduce_sum(values: list[float], device: torch.device, info: DistInfo) -> list[float]:
    """Sum ``values`` over ranks (identity when not distributed)."""
    if not info.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


DATA_SEED_STRIDE = 1000
"""Rank r reads the data stream of seed ``seed + r * DATA_SEED_STRIDE`` (its own shard and order)."""


def rank_seed(seed: int, info: DistInfo) -> int:
    """The data seed of this rank: every command spaces the ranks' data streams the same way."""
    return seed + info.rank * DATA_SEED_STRIDE


def agree_any(flag: bool, device: torch.device, info: DistInfo) -> bool:
    """True on every rank when ``flag`` is True on any rank (identity when not distributed)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    try:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    except Exception as exc:
        lost = lost_rank(exc, "while the ranks agreed on whether to stop")
        if lost is None:
            raise
        raise lost from None
    return bool(t.item() > 0)


def lost_rank(exc: BaseException, where: str) -> RankLostError | None:
    """The one-line error for a collective that failed because another rank is gone (gloo: its
    connection reset or closed; NCCL: a distributed backend error), or None for any other error."""
    if not dist.is_initialized():
        return None
    gloo = isinstance(exc, RuntimeError) and "gloo" in str(exc).lower()
    if not (gloo or isinstance(exc, dist.DistError)):
        return None
    lines = str(exc).strip().splitlines()
    # gloo: "[.../pair.cc:537] Read error [127.0.0.1]:38837: Connection reset by peer. This is ..."
    said = re.sub(r"^\[[^\]]*\]\s*", "", lines[0]).split(". ")[0][:120] if lines else type(exc).__name__
    return RankLostError(
        f"rank {dist.get_rank()} of {dist.get_world_size()} lost another rank {where} ({said}): "
        "a rank died or was killed, see torchrun's report for which"
    )


def wrap_ddp(model: torch.nn.Module, device: torch.device, info: DistInfo) -> torch.nn.Module:
    """``model`` in DistributedDataParallel when running distributed (on this rank's GPU), else itself."""
    if not info.enabled:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
