"""Options of registered things (algorithms, models), validated from their annotations.

A method is a dataclass; each field is one TOML option. Its annotation gives the type and
``option(...)`` its range and allowed values, so ``--set algorithm.mu=abc`` is a ConfigError
that names the key, the expected type and the default, never a TypeError deep in training::

    @dataclass
    class FedProx(FedAvg):
        mu: float = option(0.01, ge=0, help="proximal weight")

Models are plain factories; their keyword parameters (with annotations) are checked the same
way by :func:`check_call`. Hand-written: no maintained library validates TOML values against
dataclass annotations with closest-name hints and ranges without adding a dependency
(pydantic would do it, at the cost of a heavy dependency for one function).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from histofed.config import ConfigError
from histofed.registry import closest

_MISSING = dataclasses.MISSING


class _NoDefault:
    def __repr__(self) -> str:
        return "(required)"


NO_DEFAULT = _NoDefault()


@dataclass(frozen=True)
class Param:
    """One option: its type (annotation), default and constraints."""

    name: str
    annotation: Any = Any
    default: Any = NO_DEFAULT
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple | None = None
    help: str = ""


def option(default: Any = _MISSING, *, ge: float | None = None, gt: float | None = None,
           le: float | None = None, lt: float | None = None, choices: tuple | None = None,
           help: str = "", default_factory: Callable[[], Any] | None = None) -> Any:
    """A dataclass field carrying its constraints (read by :func:`dataclass_params`)."""
    meta = {"ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices, "help": help}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def dataclass_params(cls: type) -> dict[str, Param]:
    """The init fields of a dataclass as :class:`Param`, with resolved annotations."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        default = f.default if f.default is not _MISSING else (
            f.default_factory() if f.default_factory is not _MISSING else NO_DEFAULT)
        meta = {k: v for k, v in f.metadata.items() if k in Param.__dataclass_fields__}
        out[f.name] = Param(f.name, hints.get(f.name, Any), default, **meta)
    return out


def signature_params(fn: Callable) -> dict[str, Param]:
    """Keyword parameters of a function or class constructor as :class:`Param`."""
    target = fn.__init__ if inspect.isclass(fn) else fn
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # unresolvable annotations: check names only
        hints = {}
    out = {}
    for name, p in inspect.signature(fn).parameters.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or name == "self":
            continue
        default = p.default if p.default is not inspect.Parameter.empty else NO_DEFAULT
        out[name] = Param(name, hints.get(name, Any), default)
    return out


def check_values(where: str, params: dict[str, Param], given: dict[str, Any]) -> dict[str, Any]:
    """Validate ``given`` against ``params``; returns the values coerced to their types.

    Raises:
        ConfigError: unknown key (with the closest valid one), wrong type, out of range, or a
            value not among the allowed choices. The message names ``where`` and the key.
    """
    out = {}
    for key, value in given.items():
        if key not in params:
            valid = ", ".join(params) or "(none)"
            raise ConfigError(f"unknown option {key!r} for {where}.{closest(key, list(params))} "
                              f"Valid options: {valid}")
        out[key] = _check_one(where, params[key], value)
    return out


def check_call(where: str, fn: Callable, kwargs: dict[str, Any], *, fixed: tuple[str, ...] = ()):
    """Validate ``kwargs`` for ``fn``'s keyword parameters (``fixed`` ones are set by histofed,
    not by the user) and return them coerced."""
    params = signature_params(fn)
    given = {k: v for k, v in kwargs.items() if k not in fixed}
    return {**check_values(where, params, given), **{k: kwargs[k] for k in fixed if k in kwargs}}


def _check_one(where: str, p: Param, value: Any) -> Any:
    default = "" if p.default is NO_DEFAULT else f" (default {p.default!r})"
    try:
        value = coerce(value, p.annotation)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: option {p.name} = {value!r} should be "
                          f"{type_name(p.annotation)}{default}") from None
    if p.choices is not None and value not in p.choices:
        raise ConfigError(f"{where}: option {p.name} = {value!r}: choose one of "
                          f"{', '.join(repr(c) for c in p.choices)}")
    if isinstance(value, int | float) and not isinstance(value, bool):
        for bound, ok, text in ((p.ge, lambda b: value >= b, ">="), (p.gt, lambda b: value > b, ">"),
                                (p.le, lambda b: value <= b, "<="), (p.lt, lambda b: value < b, "<")):
            if bound is not None and not ok(bound):
                raise ConfigError(f"{where}: option {p.name} = {value!r} must be {text} {bound}"
                                  f"{default}")
    return value


def coerce(value: Any, annotation: Any) -> Any:
    """``value`` as ``annotation`` says (int, float, bool, str, list/tuple/dict, unions, Any).

    Strings from ``--set`` are parsed ("3" -> 3, "true" -> True); a bool is never an int and a
    float with a fraction is never an int. Raises TypeError/ValueError on a mismatch.
    """
    if annotation is Any or annotation is object:
        return value
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        for arg in [a for a in args if a is not type(None)]:
            try:
                return coerce(value, arg)
            except (TypeError, ValueError):
                continue
        raise TypeError(value)
    if origin is typing.Literal:
        if value in typing.get_args(annotation):
            return value
        raise ValueError(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise TypeError(value)
    if annotation is int:
        if isinstance(value, bool):
            raise TypeError(value)
        if isinstance(value, str):
            value = float(value) if any(c in value for c in ".eE") else int(value)
        if isinstance(value, float):
            if not value.is_integer():
                raise ValueError(value)
            value = int(value)
        if not isinstance(value, int):
            raise TypeError(value)
        return value
    if annotation is float:
        if isinstance(value, bool):
            raise TypeError(value)
        value = float(value) if isinstance(value, int | str) else value
        if not isinstance(value, float) or not math.isfinite(value):
            raise TypeError(value)  # NaN or inf would only surface later, as NaN weights
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise TypeError(value)
        return value
    if origin in (list, tuple) or annotation in (list, tuple):
        if not isinstance(value, list | tuple):
            raise TypeError(value)
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        items = [coerce(v, args[0]) for v in value] if len(args) == 1 or (
            origin is tuple and Ellipsis in typing.get_args(annotation)) else list(value)
        return tuple(items) if (origin or annotation) is tuple else items
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise TypeError(value)
        return dict(value)
    if isinstance(annotation, type) and not isinstance(value, annotation):
        raise TypeError(value)
    return value


def type_name(annotation: Any) -> str:
    """'a float', 'an int', 'a list of int', 'a float or None', ..."""
    names = {int: "an int", float: "a number", bool: "true or false", str: "a string",
             dict: "a table", list: "a list", tuple: "a list"}
    if annotation in names:
        return names[annotation]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        parts = list(dict.fromkeys(type_name(a) for a in typing.get_args(annotation)
                                   if a is not type(None)))  # tuple[int, ...] | list[int]: once
        none = type(None) in typing.get_args(annotation)
        return " or ".join(parts) + (" (or omitted)" if none else "")
    if origin in (list, tuple):
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        return f"a list of {type_name(args[0]).split(' ', 1)[-1]}" if args else "a list"
    if origin is dict:
        return "a table"
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    return getattr(annotation, "__name__", str(annotation))
