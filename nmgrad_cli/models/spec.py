"""Load user objects from ``package.module:attr`` specs, with one-line errors that say what to fix."""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable
from typing import Any

from ..errors import ImportSpecError


def one_line(exc: BaseException) -> str:
    """``TypeName: first line of the message`` (just the type name if there is no message)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def is_spec(text: str) -> bool:
    """True for ``package.module:attr`` strings (anything with a colon)."""
    return ":" in text


def _import(module_name: str, spec: str, option: str):
    # Like `python -m`, look in the current folder first, so `--model mymodels:make` works where
    # mymodels.py is; the path is restored right after the import.
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and (module_name == missing or module_name.startswith(missing + ".")):
            raise ImportSpecError(
                f"{option} {spec}: no module named '{missing}'; install it or run from the folder that contains it"
            ) from None
        raise ImportSpecError(f"{option} {spec}: importing '{module_name}' failed: {one_line(exc)}") from None
    except Exception as exc:
        raise ImportSpecError(f"{option} {spec}: importing '{module_name}' raised {one_line(exc)}") from None
    finally:
        if added:
            sys.path.remove(cwd)


def load_object(spec: str, option: str = "--model") -> Any:
    """Import ``package.module`` and return its (possibly dotted) attribute ``attr``.

    ``option`` names the command-line option in error messages. Errors (all
    :class:`~nmgrad_cli.errors.ImportSpecError`): malformed spec, module not found, the import
    raising, attribute missing.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name.strip() or not attr.strip():
        raise ImportSpecError(
            f"{option} '{spec}' is not of the form package.module:attr (e.g. mypkg.models:make_model)"
        )
    obj = _import(module_name.strip(), spec, option)
    path = module_name.strip()
    for part in attr.strip().split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ImportSpecError(f"{option} {spec}: '{path}' has no attribute '{part}'; check the name") from None
        path = f"{path}.{part}"
    return obj


def accepted_kwargs(fn: Callable, offered: dict) -> dict:
    """The entries of ``offered`` that ``fn``'s signature accepts by keyword (all of them for ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(offered)
    ok = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {k: v for k, v in offered.items() if k in params and params[k].kind in ok}


def call_factory(fn: Any, spec: str, option: str, offered: dict | None = None) -> Any:
    """Call a user factory with the keywords of ``offered`` it accepts; wrap anything it raises."""
    if not callable(fn):
        raise ImportSpecError(f"{option} {spec} is a {type(fn).__name__}, not a callable factory")
    kwargs = accepted_kwargs(fn, offered or {})
    try:
        return fn(**kwargs)
    except Exception as exc:
        raise ImportSpecError(f"{option} {spec} raised {one_line(exc)}") from None
