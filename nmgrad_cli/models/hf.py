"""Hugging Face models (``--model hf:<folder or hub id>``) and plain-text data (``--data text:<file>``).

Loading is offline (``local_files_only``): a folder written by ``save_pretrained``, or a hub id
already in the local Hugging Face cache. ``--hf-task`` picks the Auto class (:data:`AUTO_CLASSES`):
causal-lm (default), seq-cls, seq2seq-lm (T5, BART) or image-cls (ViT, ConvNeXt). Batches are dicts
(``input_ids``, ``attention_mask``, ``labels``; seq2seq adds ``decoder_input_ids``; images
``pixel_values``) passed as keywords; the model's ``.loss`` is the loss.

``text:<file>`` cuts a UTF-8 file into fixed-length blocks of token ids, with the model's tokenizer
when the folder has one, else one id per character; for seq2seq-lm the first half of a block is the
encoder's input and the second half the labels. Images: :mod:`nmgrad_cli.data.images`. Needs the
optional extra: ``pip install 'nmgrad[hf]'``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..data.batches import Batches, Data
from ..data.images import IMAGES_PREFIX, image_folder_data, resized_digits_data
from ..errors import ImportSpecError, NmgradError
from .spec import one_line

AUTO_CLASSES = {
    "causal-lm": lambda tf: tf.AutoModelForCausalLM,
    "seq-cls": lambda tf: tf.AutoModelForSequenceClassification,
    "seq2seq-lm": lambda tf: tf.AutoModelForSeq2SeqLM,
    "image-cls": lambda tf: tf.AutoModelForImageClassification,
}
"""``--hf-task`` -> the transformers Auto class a ``hf:`` model is loaded with."""
HF_TASKS = tuple(AUTO_CLASSES)
"""``--hf-task`` choices."""
HF_TASK_HELP = "For hf: models: " + ", ".join(HF_TASKS) + " (T5/BART: seq2seq-lm; ViT/ConvNeXt: image-cls)."

HF_PREFIX = "hf:"
TEXT_PREFIX = "text:"
MAX_BLOCK = 64
"""Tokens per ``text:`` block (fewer when the model's context is shorter)."""
EVAL_FRACTION = 0.1
HF_BATCH_SIZE = 8
"""Default batch size of the data nmgrad makes for an ``hf:`` model (``text:FILE``, images)."""


def is_hf(model: str) -> bool:
    return model.startswith(HF_PREFIX)


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ImportSpecError(
            "--model hf:... needs the transformers package: pip install 'nmgrad[hf]'"
        ) from None
    return transformers


def load_hf(spec: str, task: str = "causal-lm") -> tuple[nn.Module, object | None]:
    """(model, tokenizer or None) of ``hf:<folder or hub id>``, offline; one-line errors."""
    if task not in HF_TASKS:
        raise NmgradError(f"--hf-task '{task}' is unknown: choose one of {', '.join(HF_TASKS)}")
    name = spec[len(HF_PREFIX):]
    if not name:
        raise ImportSpecError("--model hf: needs a folder or a hub id, e.g. hf:./tiny-gpt2")
    tf = _transformers()
    path = Path(name).expanduser()
    local = path.is_dir()
    if path.exists() and not local:
        raise ImportSpecError(f"--model {spec}: {path} is a file; give the folder the model was saved to")
    if local and not (path / "config.json").is_file():
        raise ImportSpecError(
            f"--model {spec}: {path} holds no Hugging Face model (no config.json); save one there with "
            "model.save_pretrained(folder)"
        )
    auto = AUTO_CLASSES[task](tf)
    source = str(path) if local else name
    tf.logging.set_verbosity_error()  # no config warnings or loading bars between nmgrad's lines
    tf.logging.disable_progress_bar()
    try:
        model = auto.from_pretrained(source, local_files_only=True)
    except Exception as exc:  # OSError, ValueError, KeyError from transformers' loaders
        if not local:
            raise ImportSpecError(
                f"--model {spec}: no folder {name} and no model '{name}' in the local Hugging Face cache (nmgrad"
                f" loads offline): download it first (hf download {name}) or give a folder"
            ) from None
        raise ImportSpecError(f"--model {spec}: cannot load a {task} model from {path}: {one_line(exc)}") from None
    tokenizer = None
    if not local or any((path / f).is_file() for f in _TOKENIZER_FILES):
        try:
            tokenizer = tf.AutoTokenizer.from_pretrained(source, local_files_only=True)
        except Exception:  # no usable tokenizer: characters are used
            tokenizer = None
    return model, tokenizer


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model",
                    "spiece.model")


def context_length(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def text_file_data(
    spec: str,
    batch_size: int = 8,
    seed: int = 0,
    tokenizer=None,
    vocab_size: int | None = None,
    block_size: int = MAX_BLOCK,
    as_dict: bool = True,
    decoder_start: int | None = None,
) -> Data:
    """``text:<file>`` as fixed-length blocks: train (the first 90%, shuffled by ``seed`` each epoch)
    and eval (the rest). Dict batches ``{input_ids, attention_mask, labels}`` (labels = input_ids:
    a causal LM shifts them itself), or ``(x, y)`` with ``y`` shifted by one for other models.

    With ``decoder_start`` (a seq2seq model's ``decoder_start_token_id``): the first half of each
    block is ``input_ids``, the second half ``labels``, and ``decoder_input_ids`` are the labels
    shifted right behind ``decoder_start`` (what T5 and BART build from labels themselves)."""
    path = Path(spec[len(TEXT_PREFIX):]).expanduser()
    if not path.is_file():
        raise NmgradError(f"--data {spec}: no such file {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise NmgradError(f"--data {spec}: {path} is not UTF-8 text") from None
    if tokenizer is not None:
        ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
        unit = "tokens"
    else:
        chars = sorted(set(text))
        if vocab_size is not None and len(chars) > vocab_size:
            raise NmgradError(
                f"--data {spec}: the text has {len(chars)} distinct characters but the model's vocabulary has"
                f" {vocab_size}: save a tokenizer beside the model, or use a larger vocabulary"
            )
        index = {c: i for i, c in enumerate(chars)}
        ids = torch.tensor([index[c] for c in text], dtype=torch.long)
        unit = "characters"
        vocab_size = vocab_size or len(chars)
    span = block_size + (0 if as_dict else 1)
    n_blocks = len(ids) // span
    if n_blocks < 2:
        raise NmgradError(f"--data {spec}: {len(ids)} {unit} make fewer than 2 blocks of {span}: give a longer text")
    blocks = ids[: n_blocks * span].view(n_blocks, span)
    n_eval = max(1, int(n_blocks * EVAL_FRACTION))
    train, held = blocks[:-n_eval], blocks[-n_eval:]
    bs = min(batch_size, len(train))

    def batch(rows: torch.Tensor):
        if decoder_start is not None:
            src, tgt = rows[:, : rows.shape[1] // 2], rows[:, rows.shape[1] // 2 :]
            dec = torch.cat([torch.full_like(tgt[:, :1], decoder_start), tgt[:, :-1]], 1)
            return {"input_ids": src, "attention_mask": torch.ones_like(src), "decoder_input_ids": dec,
                    "labels": tgt.clone()}
        if as_dict:
            return {"input_ids": rows, "attention_mask": torch.ones_like(rows), "labels": rows.clone()}
        return rows[:, :-1], rows[:, 1:]

    def train_epoch(_e: int, gen: torch.Generator):
        order = torch.randperm(len(train), generator=gen)
        for s in range(0, len(order) - bs + 1, bs):
            yield batch(train[order[s:s + bs]])

    def eval_epoch(_e: int, _gen: torch.Generator):
        for s in range(0, len(held), bs):
            yield batch(held[s:s + bs])

    info = {"block_size": block_size, "text_file": os.fspath(path), "units": unit}
    if vocab_size is not None:
        info["vocab_size"] = vocab_size
    return Data(
        train=Batches(train_epoch, len(train) // bs, seed),
        eval=Batches(eval_epoch, -(-len(held) // bs), seed),
        info=info,
    )


def hf_data(
    net: nn.Module, tokenizer, data: str, task: str, batch_size: int | None, seed: int, data_dir=None
) -> Data | None:
    """The data nmgrad makes for an ``hf:`` model of ``task``: ``text:FILE`` blocks (causal-lm,
    seq2seq-lm), ``images:FOLDER`` or the built-in ``digits`` resized (image-cls); None for other
    ``--data`` (a built-in data set or a factory, which the caller resolves). One-line errors for a
    data kind the task cannot use."""
    cfg = getattr(net, "config", None)
    bs = batch_size or HF_BATCH_SIZE
    if data.startswith(TEXT_PREFIX):
        if task not in ("causal-lm", "seq2seq-lm"):
            raise NmgradError(
                f"--data {data} makes language-model blocks without labels for --hf-task {task}: give"
                " --data package.module:factory yielding dicts with input_ids and labels"
            )
        start = None
        if task == "seq2seq-lm":
            start = getattr(cfg, "decoder_start_token_id", None)
            if start is None:
                raise NmgradError("--hf-task seq2seq-lm: the model's config has no decoder_start_token_id: set it "
                                  "(T5 uses its pad id 0, BART 2) and save the model again")
        block = min(MAX_BLOCK, context_length(net) or MAX_BLOCK)
        vocab = getattr(cfg, "vocab_size", None)
        return text_file_data(data, bs, seed, tokenizer, vocab, block, as_dict=True, decoder_start=start)
    image = data.startswith(IMAGES_PREFIX) or (task == "image-cls" and data == "digits")
    if not image:
        return None
    if task != "image-cls":
        raise NmgradError(f"--data {data} is image data: use it with --hf-task image-cls (ViT, ConvNeXt)")
    size, channels = getattr(cfg, "image_size", None), getattr(cfg, "num_channels", None)
    size = size[0] if isinstance(size, (list, tuple)) else size
    if not isinstance(size, int) or not isinstance(channels, int):
        raise NmgradError(f"--hf-task image-cls: the model's config has no image_size/num_channels (found {size}, "
                          f"{channels}): set them and save the model again")
    if data == "digits":
        d = resized_digits_data(bs, seed, size, channels, data_dir)
    else:
        d = image_folder_data(data, bs, seed, size, channels)
    labels = getattr(cfg, "num_labels", None)
    if isinstance(labels, int) and labels < d.info["n_classes"]:
        raise NmgradError(f"--data {data} has {d.info['n_classes']} classes but the model {labels} labels: build it "
                          f"with num_labels={d.info['n_classes']}")
    return d
