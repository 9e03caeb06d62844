"""Output files, written safely: the one check every output path goes through, and atomic writes.

Every command that writes a file (capture's dump, evaluate's ``--json``/``--csv``, train's run files
and ``--json``) uses these, so the rules are the same everywhere:

- an existing file is overwritten only with ``--force`` (:func:`check_output`);
- an output is never one of the command's inputs, and two outputs are never the same file, even
  with ``--force`` (:func:`check_distinct`);
- a text output is written to a temporary file in the same folder and renamed over the target
  (:func:`atomic_open`), so a full disk or a crash leaves the old file or none, never a truncated
  one, and the error names the file.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO

from .errors import OutputError, OutputExistsError

STDOUT = "-"


def check_output(path: str | os.PathLike, force: bool) -> Path:
    """Refuse to overwrite an existing file without ``force``; check the folder is writable."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path} is a directory: give a file path for the output")
    if path.exists() and not force:
        raise OutputExistsError(f"{path} exists: pass --force to overwrite it, or choose another path")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"cannot write {path}: folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"cannot write {path}: folder {parent} is not writable; choose another path")
    return path


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when ``a`` and ``b`` name one file (links and ``..`` resolved; either may not exist yet)."""
    a, b = Path(a), Path(b)
    with contextlib.suppress(OSError):
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def check_distinct(outputs: Mapping[str, str | os.PathLike | None], inputs: Iterable[str | os.PathLike] = ()) -> None:
    """Refuse an output that is one of ``inputs``, and two ``outputs`` that are the same file.

    ``outputs`` maps an option name (``--json``) to its path; None and ``-`` (stdout) are skipped.
    """
    named = [(opt, Path(p)) for opt, p in outputs.items() if p is not None and str(p) != STDOUT]
    inputs = [Path(p) for p in inputs]
    for opt, path in named:
        for inp in inputs:
            if same_file(path, inp):
                raise OutputError(
                    f"{opt} {path} is one of the input files: writing it would destroy it; choose another path"
                )
    for i, (opt_a, a) in enumerate(named):
        for opt_b, b in named[i + 1:]:
            if same_file(a, b):
                raise OutputError(f"{opt_a} and {opt_b} are the same file {a}: give each its own path")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, newline: str | None = None, binary: bool = False) -> Iterator[IO]:
    """A text (or, with ``binary``, bytes) file handle whose content replaces ``path`` only when the
    block ends without error.

    Written to a temporary file in the same folder, flushed to disk, then renamed over ``path``;
    on any error the temporary file is removed and ``path`` is left as it was. ``-`` is stdout.
    A ``path`` that exists and is not a regular file (``/dev/stdout``, a pipe) is written in place.
    An ``OSError`` (full disk, read-only folder) becomes :class:`OutputError` naming the file.
    """
    if str(path) == STDOUT:
        yield sys.stdout.buffer if binary else sys.stdout
        return
    path = Path(path)
    mode = {"mode": "wb"} if binary else {"mode": "w", "encoding": "utf-8", "newline": newline}
    try:
        if path.exists() and not path.is_file():
            with open(path, **mode) as fh:
                yield fh
            return
        fd, tmp = tempfile.mkstemp(dir=path.parent if str(path.parent) else ".", prefix=f".{path.name}.",
                                   suffix=".tmp")
    except OSError as exc:
        raise _write_error(path, exc) from None
    try:
        with os.fdopen(fd, **mode) as fh:
            os.fchmod(fh.fileno(), 0o666 & ~_umask())
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise _write_error(path, exc) from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_open`); ``-`` is stdout."""
    with atomic_open(path) as fh:
        fh.write(text)


def _write_error(path: Path, exc: OSError) -> OutputError:
    reason = exc.strerror or str(exc)
    return OutputError(f"cannot write {path}: {reason}; it was left as it was (free some space or choose another path)")
