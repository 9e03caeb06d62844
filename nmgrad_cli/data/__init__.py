"""Small real data sets for the built-in tasks (files in ``sample_data/``, see sample_data/LICENSE.md).

- :func:`digits`: UCI optdigits 8x8 handwritten digits, a fixed 1500/297 train/test split.
- :func:`text`: character-level blocks of the CPython documentation topics (90/10 train/val split).

Both return a :class:`Batches`: an iterable whose every ``iter()`` is one epoch of
``(input, target)`` CPU tensor batches, reproducible from ``seed``. Where the files are:
:func:`sample_data_dir`.
"""

from .batches import Batches, Data, cycle
from .digits import DIGITS_FILE, digits
from .paths import ENV_VAR, sample_data_dir
from .text import TEXT_FILE, CharVocab, text

__all__ = [
    "DIGITS_FILE",
    "ENV_VAR",
    "TEXT_FILE",
    "Batches",
    "CharVocab",
    "Data",
    "cycle",
    "digits",
    "sample_data_dir",
    "text",
]
