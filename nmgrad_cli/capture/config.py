"""The configuration of one capture run: :class:`CaptureConfig` (written into every dump's ``run``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..dump.writer import COMPRESSIONS
from ..errors import NmgradError
from ..layers import parse_layers
from ..limits import MAX_BATCH, MAX_STEPS, check_count

MODULE_TYPES = ("Linear", "Conv1d", "Conv2d", "Conv3d")
OPTIMIZERS = ("adamw", "sgd")
AMP = ("none", "bf16")


@dataclass(frozen=True)
class CaptureConfig:
    """What to train, what to record, where to write it."""

    model: str = "mlp"
    """Built-in model (mlp, cnn, gpt), ``package.module:factory`` returning an ``nn.Module``, or
    ``hf:<folder or hub id>`` (a Hugging Face model, loaded offline)."""
    hf_task: str = "causal-lm"
    """For ``hf:`` models: causal-lm (AutoModelForCausalLM) or seq-cls (AutoModelForSequenceClassification)."""
    data: str | None = None
    """Built-in data (digits, text), ``text:<file>``, ``package.module:factory``, or None for the model's default."""
    loss: str | None = None
    """Built-in loss (cross_entropy), ``package.module:fn``, or None for cross-entropy."""
    out: str = "capture.h5"
    """Output dump; under several processes each rank writes ``<stem>.rank<r><suffix>``."""
    steps: int = 10
    """Optimizer steps after the warm-up; steps 0, every, 2*every, ... of these are recorded."""
    every: int = 1
    """Record one step in this many."""
    warmup: int = 0
    """Optimizer steps taken before the first recorded one (nothing is written during them)."""
    seed: int = 0
    """Seeds the model's initialisation and the data order: same seed, same file contents."""
    layers: str | None = None
    """Comma-separated globs on GEMM site names (e.g. ``blocks.*.mlp.*``); None selects every site."""
    module_types: tuple[str, ...] = MODULE_TYPES
    """GEMM families recorded: a subset of Linear (F.linear, x @ W, addmm), Conv1d, Conv2d, Conv3d."""
    strict: bool = False
    """Fail (exit 2) when a parameter of 2+ dims gets a gradient outside every GEMM site."""
    with_inputs: bool = False
    """Also store each call's input X and the weight W it used (records named like the gradient's)."""
    compression: str = "none"
    """HDF5 compression of every dataset: none, lzf or gzip. None by default: float32 gradients
    compress 1.00-1.12x with lzf, which made a gpt capture at --every 1 ~2.5x slower than none
    (benchmarks/capture_bench.py, docs/capture.md "Cost")."""
    max_bytes: int | None = None
    """Stop cleanly before the uncompressed bytes recorded would exceed this budget (None: no limit)."""
    batch_size: int | None = None
    """Batch size passed to the data factory (None: the data's default: digits 64, text 32)."""
    optimizer: str = "adamw"
    """adamw or sgd (momentum 0.9)."""
    lr: float = 1e-3
    """Learning rate."""
    device: str = "auto"
    """Torch device; ``auto`` is cuda when available (the local rank's GPU under torchrun), else cpu."""
    amp: str = "none"
    """Autocast dtype of the forward pass: none or bf16; gradients are stored in the dtype they had."""
    queue_mb: float = 256.0
    """Memory bound of the background writer's queue, in MB (the training step waits when it is full)."""
    force: bool = False
    """Overwrite an existing output file."""
    data_dir: str | None = None
    """Folder of the sample data files (default: ``$NMGRAD_SAMPLE_DATA`` or the repo's sample_data/)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "module_types", parse_module_types(self.module_types))
        for option, value in (("--steps", self.steps), ("--every", self.every), ("--warmup", self.warmup)):
            check_count(option, value, 0 if option == "--warmup" else 1, MAX_STEPS)
        check_count("--batch-size", self.batch_size, 1, MAX_BATCH)
        if self.max_bytes is not None and self.max_bytes < 1:
            raise NmgradError(f"--max-bytes must be >= 1, got {self.max_bytes}")
        if self.compression not in COMPRESSIONS:
            raise NmgradError(f"--compression '{self.compression}' is unknown: choose one of {', '.join(COMPRESSIONS)}")
        if self.optimizer not in OPTIMIZERS:
            raise NmgradError(f"--optimizer '{self.optimizer}' is unknown: choose one of {', '.join(OPTIMIZERS)}")
        if self.amp not in AMP:
            raise NmgradError(f"--amp '{self.amp}' is unknown: choose one of {', '.join(AMP)}")
        if not 0 < self.lr < float("inf"):  # inf (or nan) would write an all-NaN dump
            raise NmgradError(f"--lr must be a positive finite number, got {self.lr}")
        if not self.queue_mb > 0:
            raise NmgradError(f"queue_mb must be > 0, got {self.queue_mb}")
        parse_layers(self.layers)  # a selection with no glob is refused here

    @property
    def recorded_steps(self) -> int:
        """How many steps the run records (when no budget or interrupt stops it early)."""
        return -(-self.steps // self.every)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def parse_module_types(spec: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``"Linear,Conv2d"`` (or a sequence, any case) -> ``("Linear", "Conv2d")`` in canonical order."""
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec]
    items = [s for s in items if s]
    canon = {t.lower(): t for t in MODULE_TYPES}
    bad = [s for s in items if s.lower() not in canon]
    if bad:
        raise NmgradError(f"unknown module type '{bad[0]}': choose from {', '.join(MODULE_TYPES)} (e.g. Linear,Conv2d)")
    if not items:
        raise NmgradError(f"--module-types is empty: choose from {', '.join(MODULE_TYPES)}")
    chosen = {canon[s.lower()] for s in items}
    return tuple(t for t in MODULE_TYPES if t in chosen)
