"""Built-in tasks and :func:`build_task`, which turns ``--model/--data/--loss`` into a ready :class:`Task`.

Built-in tasks (model name -> default data, loss, kind)::

    mlp  digits  cross_entropy  classification
    cnn  digits  cross_entropy  classification
    gpt  text    cross_entropy  language-model

Anything else is a ``package.module:attr`` spec (see :mod:`.spec`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..data.batches import Data, cycle
from ..data.digits import digits_data
from ..data.text import text_data
from ..errors import ImportSpecError, NmgradError
from .cnn import cnn
from .gpt import gpt
from .hf import HF_TASKS, TEXT_PREFIX, hf_data, is_hf, load_hf, text_file_data
from .mlp import mlp
from .spec import call_factory, is_spec, load_object


def cross_entropy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits ``output`` [..., C] against class ids ``target`` [...]."""
    return F.cross_entropy(output.reshape(-1, output.shape[-1]).float(), target.reshape(-1))


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"cross_entropy": cross_entropy}
"""Built-in losses by ``--loss`` name."""

DATASETS: dict[str, Callable[..., Data]] = {"digits": digits_data, "text": text_data}
"""Built-in data by ``--data`` name: factories ``(batch_size, seed, data_dir) -> Data``."""

DEFAULT_BATCH_SIZE = {"digits": 64, "text": 32}


@dataclass(frozen=True)
class BuiltinTask:
    model: Callable[..., nn.Module]
    """Factory called with the data's ``info`` (e.g. ``vocab_size``) as keywords."""
    data: str
    """Default ``--data`` (a key of :data:`DATASETS`)."""
    loss: str
    """Default ``--loss`` (a key of :data:`LOSSES`)."""
    kind: str
    """``classification`` or ``language-model``."""
    description: str


TASKS: dict[str, BuiltinTask] = {
    "mlp": BuiltinTask(mlp, "digits", "cross_entropy", "classification", "MLP 64-256-256-10 on 8x8 digits"),
    "cnn": BuiltinTask(cnn, "digits", "cross_entropy", "classification", "small ResNet (BatchNorm, in-place ReLU)"),
    "gpt": BuiltinTask(gpt, "text", "cross_entropy", "language-model", "4-layer char GPT on CPython docs"),
}


@dataclass
class Task:
    """A model with its data and loss, ready to train: ``loss_fn(model(x), y)`` for ``(x, y)`` in batches."""

    model: nn.Module
    train_batches: Iterator
    """Infinite iterator of ``(input, target)`` CPU batches (epoch after epoch)."""
    eval_batches: Iterable | None
    """Re-iterable held-out batches, or None when the data has none."""
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    kind: str
    """``classification``, ``language-model`` or ``custom``."""
    info: dict = field(default_factory=dict)
    """Facts about the data (``n_classes``, ``vocab_size``, ``block_size``, ...)."""
    spec: dict = field(default_factory=dict)
    """The resolved ``model``/``data``/``loss`` names, for run metadata."""


def _data(
    data: str, batch_size: int | None, seed: int, data_dir: str | os.PathLike | None, rank: int, world_size: int
) -> Data:
    if batch_size is not None and batch_size < 1:
        raise NmgradError(f"--batch-size must be >= 1, got {batch_size}")
    if data in DATASETS:
        bs = batch_size or DEFAULT_BATCH_SIZE[data]
        return DATASETS[data](batch_size=bs, seed=seed, data_dir=data_dir)
    if data.startswith(TEXT_PREFIX):  # characters of a text file, (x, y shifted by one) like the text data
        return text_file_data(data, batch_size or DEFAULT_BATCH_SIZE["text"], seed, as_dict=False)
    if not is_spec(data):
        raise ImportSpecError(
            f"--data '{data}' is neither a built-in data set ({', '.join(DATASETS)}) nor package.module:factory"
        )
    offered = {"seed": seed, "rank": rank, "world_size": world_size}
    offered |= {"batch_size": batch_size} if batch_size is not None else {}
    out = call_factory(load_object(data, "--data"), data, "--data", offered)
    if isinstance(out, Data):
        return out
    if not isinstance(out, Iterable) or isinstance(out, (str, bytes, torch.Tensor)):
        raise ImportSpecError(
            f"--data {data} returned a {type(out).__name__}: return an iterable of (input, target) batches"
        )
    return Data(train=out)


def _loss(loss: str) -> Callable:
    if loss in LOSSES:
        return LOSSES[loss]
    if not is_spec(loss):
        raise ImportSpecError(f"--loss '{loss}' is neither a built-in loss ({', '.join(LOSSES)}) nor package.module:fn")
    fn = load_object(loss, "--loss")
    if isinstance(fn, type) and issubclass(fn, nn.Module):  # e.g. torch.nn:CrossEntropyLoss
        fn = call_factory(fn, loss, "--loss")
    if not callable(fn):
        raise ImportSpecError(f"--loss {loss} is a {type(fn).__name__}, not a callable loss(output, target)")
    return fn


def build_task(
    model: str,
    data: str | None = None,
    loss: str | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    data_dir: str | os.PathLike | None = None,
    data_seed: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    hf_task: str = "causal-lm",
) -> Task:
    """Resolve ``--model``, ``--data`` and ``--loss`` into a :class:`Task` on the CPU.

    - ``model``: a built-in name (:data:`TASKS`) or ``package.module:factory`` returning an
      ``nn.Module``; the factory gets those of the data's ``info`` keywords it accepts.
    - ``data``: None (the built-in task's data), a built-in name (:data:`DATASETS`) or
      ``package.module:factory`` returning a :class:`~nmgrad_cli.data.Data` or a re-iterable of
      ``(input, target)`` batches; the factory gets ``batch_size``, ``seed`` (= ``data_seed``),
      ``rank`` and ``world_size`` if it accepts them.
    - ``loss``: None (cross-entropy over the last dim), a name in :data:`LOSSES`, or
      ``package.module:fn`` (``fn(output, target) -> scalar``; an ``nn.Module`` class is instantiated).

    ``torch.manual_seed(seed)`` is called before the model is built, so weights are reproducible;
    the data order follows ``data_seed`` (default ``seed``; give each rank its own under DDP).

    ``hf:<folder or hub id>`` loads a Hugging Face model offline (``hf_task``: causal-lm or seq-cls,
    :mod:`.hf`); its batches are dicts and its loss the model output's ``.loss``. ``text:<file>``
    data: fixed-length blocks of a text file (the model's tokenizer, else characters).
    """
    if is_hf(model):
        return _hf_task(model, data, loss, seed, batch_size, data_dir,
                        seed if data_seed is None else data_seed, rank, world_size, hf_task)
    builtin = TASKS.get(model)
    if builtin is None and not is_spec(model):
        raise ImportSpecError(
            f"--model '{model}' is neither a built-in model ({', '.join(TASKS)}) nor package.module:factory"
        )
    factory = load_object(model, "--model") if builtin is None else None
    if data is None:
        if builtin is None:
            raise ImportSpecError(
                f"--model {model} needs --data: a built-in data set ({', '.join(DATASETS)}) or package.module:factory"
            )
        data = builtin.data
    d = _data(data, batch_size, seed if data_seed is None else data_seed, data_dir, rank, world_size)
    torch.manual_seed(seed)
    if builtin is not None:
        info = {k: v for k, v in d.info.items() if k != "vocab"}
        net = builtin.model(**info)
    else:
        net = call_factory(factory, model, "--model", d.info)
        if not isinstance(net, nn.Module):
            raise ImportSpecError(f"--model {model} returned a {type(net).__name__}, not a torch.nn.Module")
    loss = loss or (builtin.loss if builtin is not None else "cross_entropy")
    return Task(
        model=net,
        train_batches=cycle(d.train, f"--data {data}"),
        eval_batches=d.eval,
        loss_fn=_loss(loss),
        kind=builtin.kind if builtin is not None else "custom",
        info=dict(d.info),
        spec={"model": model, "data": data, "loss": loss},
    )


def _hf_task(model, data, loss, seed, batch_size, data_dir, data_seed, rank, world_size, hf_task) -> Task:
    if hf_task not in HF_TASKS:
        raise NmgradError(f"--hf-task '{hf_task}' is unknown: choose one of {', '.join(HF_TASKS)}")
    if data is None:
        raise ImportSpecError(
            f"--model {model} needs --data: text:<file> (causal-lm, seq2seq-lm), images:<folder> or digits "
            "(image-cls), or package.module:factory yielding dict batches (input_ids, attention_mask, labels)"
        )
    torch.manual_seed(seed)
    net, tokenizer = load_hf(model, hf_task)
    d = hf_data(net, tokenizer, data, hf_task, batch_size, data_seed, data_dir)
    if d is None:
        d = _data(data, batch_size, data_seed, data_dir, rank, world_size)
    return Task(
        model=net,
        train_batches=cycle(d.train, f"--data {data}"),
        eval_batches=d.eval,
        loss_fn=_loss(loss) if loss else cross_entropy,
        kind="language-model" if hf_task.endswith("-lm") else "classification",
        info=dict(d.info),
        spec={"model": model, "data": data, "loss": loss or "model output .loss", "hf_task": hf_task},
    )


def forward_loss(model: nn.Module, batch, loss_fn: Callable) -> tuple:
    """(output, loss, target) of one batch: ``model(**batch)`` and its ``.loss`` for a dict batch
    (Hugging Face style), ``loss_fn(model(x), y)`` for an ``(input, target)`` pair."""
    if isinstance(batch, dict):
        out = model(**batch)
        loss = getattr(out, "loss", None)
        if loss is None:
            if "labels" not in batch:
                raise NmgradError(
                    f"a data batch has no 'labels' (keys: {', '.join(map(str, batch))}) and the model returned no"
                    " loss: give dict batches with labels"
                )
            raise NmgradError(
                f"the model's output ({type(out).__name__}) has no .loss for a dict batch with labels: return an"
                " output with .loss, or yield (input, target) pairs with --loss"
            )
        return out, loss, batch.get("labels")
    x, y = split_batch(batch)
    out = model(x)
    return out, loss_fn(out, y), y


def split_batch(batch) -> tuple:
    """``(input, target)`` of one batch, or a one-line error about the batch's form."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise NmgradError(
        f"a data batch is a {type(batch).__name__}"
        + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
        + ": the data must yield (input, target) pairs"
    )


def to_device(x, device: torch.device | str):
    """Move a tensor, or a tuple/list/dict of tensors, to ``device``."""
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(v, device) for v in x)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    return x
