"""Where the sample data files live: an explicit folder, ``$NMGRAD_SAMPLE_DATA``, or the repo's sample_data/."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import NmgradError

ENV_VAR = "NMGRAD_SAMPLE_DATA"
_REPO_SAMPLE_DATA = Path(__file__).resolve().parents[2] / "sample_data"


def sample_data_dir(override: str | os.PathLike | None = None) -> Path:
    """The folder holding ``digits.npz`` and ``pydoc_topics.txt``.

    Order: ``override``; then the environment variable ``NMGRAD_SAMPLE_DATA``; then ``sample_data/``
    next to the package (a git checkout or an editable install). A non-editable install does not
    ship the files: point ``NMGRAD_SAMPLE_DATA`` at a checkout's sample_data/.
    """
    if override is not None:
        return Path(override)
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    return _REPO_SAMPLE_DATA


def data_file(name: str, override: str | os.PathLike | None = None) -> Path:
    """Path of one sample data file, or a one-line error that says where it was looked for."""
    path = sample_data_dir(override) / name
    if not path.is_file():
        raise NmgradError(
            f"sample data file {path} not found: set {ENV_VAR} to a folder holding {name} "
            f"(a checkout's sample_data/, regenerate with `python sample_data/make_data.py`)"
        )
    return path
