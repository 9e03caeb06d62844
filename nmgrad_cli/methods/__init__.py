"""The one registry of pruning methods.

A method is a :class:`PruningMethod` subclass decorated with :func:`register`; the CLI choices,
``evaluate``'s default "all methods", the docs and the parametrized tests iterate over
:data:`METHODS`, so a new method is one new module imported at the bottom of this file.
"""

from __future__ import annotations

from ..errors import MethodError
from .base import PruningMethod

METHODS: dict[str, PruningMethod] = {}


def register(cls: type[PruningMethod]) -> type[PruningMethod]:
    """Class decorator: instantiate ``cls`` and add it to :data:`METHODS` under ``cls.name``."""
    if not cls.name or cls.name in METHODS:
        raise ValueError(f"pruning method name {cls.name!r} is empty or already registered")
    METHODS[cls.name] = cls()
    return cls


def get_method(name: str | PruningMethod) -> PruningMethod:
    """Look a method up by name; an unknown name raises :class:`MethodError` listing the choices."""
    if isinstance(name, PruningMethod):
        return name
    try:
        return METHODS[name]
    except KeyError:
        choices = ", ".join(METHODS)
        raise MethodError(f"unknown method '{name}': choose one of {choices}") from None


def method_names() -> list[str]:
    return list(METHODS)


def is_defined(method: str | PruningMethod, pattern) -> bool:
    """Whether ``method`` is defined for ``pattern`` (a Pattern or "N:M"); a bad pattern raises."""
    from ..errors import PatternError
    from ..patterns import parse_pattern

    pat = parse_pattern(pattern)
    try:
        get_method(method).check(pat)
    except PatternError:
        return False
    return True


# the order here is the order of tables and CLI choices
from . import greedy, random, mvue, approx_mvue, mvue12  # noqa: E402,F401,I001  (fills METHODS)

__all__ = ["METHODS", "PruningMethod", "get_method", "is_defined", "method_names", "register"]
