"""``--layers``: the one layer selection shared by capture, train, evaluate and inspect.

A selection is comma-separated fnmatch globs (case-sensitive) on layer names, e.g.
``"fc1,blocks.*.mlp.*"``; ``None``, ``""`` and ``"*"`` select every layer. Every command parses it
with :func:`parse_layers` and applies it with :func:`select_layers`, so ``--layers fc1,fc2`` means
the same thing everywhere and a selection that matches nothing gives one error listing the names
there are.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence

from .errors import NmgradError


class LayerSelectionError(NmgradError):
    """A ``--layers`` selection that is empty or matches none of the available layer names."""


def parse_layers(spec: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """The globs of a ``--layers`` value; ``None`` selects every layer.

    A string is split on commas (blank items dropped); a sequence is taken as globs already.
    A value with no glob at all (``","``) is refused rather than read as "everything".
    """
    if spec is None:
        return None
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    globs = tuple(g.strip() for g in items if g and g.strip())
    if not globs:
        if isinstance(spec, str) and spec == "":
            return None
        raise LayerSelectionError(
            f"--layers '{spec if isinstance(spec, str) else ','.join(spec)}' holds no glob: "
            "give comma-separated globs on layer names, e.g. 'fc1,blocks.*.mlp.*', or leave it out for all"
        )
    return None if "*" in globs else globs


def layer_matches(name: str, globs: tuple[str, ...] | None) -> bool:
    """Whether ``name`` is selected by the parsed ``globs`` (``None`` selects everything)."""
    return globs is None or any(fnmatch.fnmatchcase(name, g) for g in globs)


def select_layers(
    names: Iterable[str], spec: str | Sequence[str] | None, what: str = "layer"
) -> list[str]:
    """The names (in their given order) selected by the ``--layers`` value ``spec``.

    Raises :class:`LayerSelectionError` with the names there are when nothing matches; ``what``
    names the kind of thing selected in that message (e.g. "Linear/Conv2d layer", "dump layer").
    """
    names = list(names)
    globs = parse_layers(spec)
    chosen = [n for n in names if layer_matches(n, globs)]
    if not chosen:
        raise LayerSelectionError(no_match_message(names, spec, what))
    return chosen


def no_match_message(names: Sequence[str], spec: str | Sequence[str] | None, what: str = "layer") -> str:
    """The one-line "no layer matches" message, listing (some of) the names there are."""
    shown_spec = spec if isinstance(spec, str) or spec is None else ",".join(spec)
    if not names:
        return f"there is no {what} to select from (--layers '{shown_spec}')"
    shown = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
    return (
        f"no {what} matches --layers '{shown_spec}': the names are {shown}; "
        "give comma-separated globs such as 'fc1,blocks.*.mlp.*'"
    )
