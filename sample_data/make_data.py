"""Regenerate the small data sets in sample_data/ (run from anywhere: ``python sample_data/make_data.py``).

- ``digits.npz``: the 1797 8x8 handwritten digits of UCI optdigits that scikit-learn bundles
  (``sklearn.datasets.load_digits``); arrays ``images`` uint8 [1797, 8, 8] in 0..16, ``labels`` uint8 [1797].
  scikit-learn is needed only here, never at run time.
- ``pydoc_topics.txt``: the plain-text Python documentation topics that ship with CPython in
  ``pydoc_data/topics.py`` (every topic, sorted by name, each under a ``== name ==`` heading), UTF-8.

See LICENSE.md for the license and attribution of each file. The dump ``mlp_digits.h5`` is made by
``make_dump.sh``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def make_digits(path: Path) -> None:
    from sklearn.datasets import load_digits  # build-time only

    d = load_digits()
    images = d.images.astype(np.uint8)  # values 0..16
    labels = d.target.astype(np.uint8)
    assert images.shape == (1797, 8, 8) and int(images.max()) == 16 and sorted(set(labels.tolist())) == list(range(10))
    np.savez_compressed(path, images=images, labels=labels)


def make_topics(path: Path) -> None:
    from pydoc_data.topics import topics

    parts = [f"== {name} ==\n\n{topics[name].strip()}\n" for name in sorted(topics)]
    text = "\n".join(parts)
    path.write_text(text, encoding="utf-8")


def main() -> None:
    make_digits(HERE / "digits.npz")
    make_topics(HERE / "pydoc_topics.txt")
    for name in ("digits.npz", "pydoc_topics.txt"):
        print(f"{name}: {(HERE / name).stat().st_size} bytes", file=sys.stderr)


if __name__ == "__main__":
    main()
