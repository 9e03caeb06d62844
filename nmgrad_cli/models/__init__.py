"""Built-in models and tasks, and the ``package.module:attr`` loader for user models, data and losses.

Quick use::

    from nmgrad_cli.models import build_task, split_batch
    task = build_task("gpt", seed=0)             # or build_task("mypkg.models:make", data="mypkg.data:batches")
    x, y = split_batch(next(task.train_batches))
    loss = task.loss_fn(task.model(x), y)
"""

from .cnn import ResNetSmall, cnn
from .gpt import GPT, GPTConfig, gpt
from .mlp import MLP, mlp
from .registry import (
    DATASETS,
    LOSSES,
    TASKS,
    BuiltinTask,
    Task,
    build_task,
    cross_entropy,
    forward_loss,
    split_batch,
    to_device,
)
from .spec import call_factory, is_spec, load_object, one_line

__all__ = [
    "DATASETS",
    "GPT",
    "LOSSES",
    "MLP",
    "TASKS",
    "BuiltinTask",
    "GPTConfig",
    "ResNetSmall",
    "Task",
    "build_task",
    "call_factory",
    "cnn",
    "cross_entropy",
    "forward_loss",
    "gpt",
    "is_spec",
    "load_object",
    "mlp",
    "one_line",
    "split_batch",
    "to_device",
]
