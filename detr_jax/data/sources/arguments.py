"""The declared keyword arguments of a data source: one `Arg` (accepted types, default, one line) per argument.

A source declares its arguments once, as a class-level `ARGUMENTS = Arguments(name=Arg(...), ...)`, and its
constructor binds what it is given with `ARGUMENTS.bind` (positional arguments in declaration order, then
keywords; defaults filled in), so the declaration the config check reads (`sources.check_source_kwargs`) is the one
the constructor uses. Nothing here imports a source's dependencies (TFDS sources import tensorflow_datasets only
when constructed).
"""

import difflib
import inspect
import numbers
import os
import types
from typing import Any, Mapping, NamedTuple, Tuple

import numpy as np


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED = _Required()  # the default of an argument that the caller must give
PATH = (str, os.PathLike)  # a file or folder path (config values are str)


class Arg(NamedTuple):
    """One keyword argument: `type` a type or a tuple of types (None among them: None is accepted), `default`
    (REQUIRED: none), `doc` one line. int is accepted for float, list for tuple; bool is not accepted for int or
    float, nor int for bool."""
    type: Any
    default: Any
    doc: str

    @property
    def types(self) -> Tuple[type, ...]:
        kinds = self.type if isinstance(self.type, tuple) else (self.type,)
        return tuple(type(None) if k is None else k for k in kinds)

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def accepts(self, value) -> bool:
        return any(_is_a(value, kind) for kind in self.types)

    def type_name(self) -> str:
        names = {str: "str", int: "int", float: "float (or int)", bool: "bool", tuple: "tuple (or list)",
                 type(None): "None", os.PathLike: "path"}
        return " or ".join(dict.fromkeys(names.get(k, k.__name__) for k in self.types))


def _is_a(value, kind: type) -> bool:
    if kind is bool:
        return isinstance(value, (bool, np.bool_))
    if kind is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))
    if kind is float:
        return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
    if kind is tuple:
        return isinstance(value, (tuple, list))
    return isinstance(value, kind)


class Arguments:
    """The declared arguments of one source, in positional order (required ones first)."""

    def __init__(self, **args: Arg):
        self.args: Mapping[str, Arg] = types.MappingProxyType(dict(args))
        # The constructor's signature, for inspect / help(): sources set `__signature__ = ARGUMENTS.signature`.
        self.signature = inspect.Signature([
            inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=arg.type,
                              default=inspect.Parameter.empty if arg.required else arg.default)
            for name, arg in self.args.items()])

    def __repr__(self) -> str:
        return f"Arguments({', '.join(self.args)})"

    def names(self) -> Tuple[str, ...]:
        return tuple(self.args)

    def defaults(self) -> dict:
        """{name: default} of the arguments that have one."""
        return {name: arg.default for name, arg in self.args.items() if not arg.required}

    def check(self, kwargs: Mapping[str, Any], owner: str, where: str = "", complete: bool = True) -> None:
        """Raise ValueError, one line starting with `where`, at the first key `owner` does not accept, value of a
        type it does not take, or (`complete`) required argument missing."""
        prefix = f"{where}: " if where else ""
        for key, value in kwargs.items():
            arg = self.args.get(key)
            if arg is None:
                close = difflib.get_close_matches(key, self.args, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"{prefix}{owner} has no argument {key!r}{hint}; it accepts {self.accepted()}")
            if not arg.accepts(value):
                raise ValueError(f"{prefix}{owner} takes {arg.type_name()} for {key!r} ({arg.doc}), got {value!r} "
                                 f"of type {type(value).__name__}")
        if complete:
            missing = [name for name, arg in self.args.items() if arg.required and name not in kwargs]
            if missing:
                raise ValueError(f"{prefix}{owner} needs {missing[0]!r} ({self.args[missing[0]].doc}); it accepts "
                                 f"{self.accepted()}")

    def accepted(self) -> str:
        """The accepted keys, the required ones marked: "ann_file (required), image_dir (required), keep_crowd"."""
        return ", ".join(f"{name} (required)" if arg.required else name for name, arg in self.args.items())

    def bind(self, owner: str, args: tuple, kwargs: Mapping[str, Any]) -> types.SimpleNamespace:
        """A constructor's (*args, **kwargs) -> a namespace of every argument (defaults filled in), checked as
        `check` does (ValueError); too many positional arguments, or one given twice, is a TypeError as in Python."""
        if len(args) > len(self.args):
            raise TypeError(f"{owner} takes at most {len(self.args)} positional arguments ({', '.join(self.args)}), "
                            f"got {len(args)}")
        values = dict(zip(self.args, args))
        twice = sorted(set(values) & set(kwargs))
        if twice:
            raise TypeError(f"{owner} got multiple values for argument {twice[0]!r}")
        values.update(kwargs)
        self.check(values, owner)
        return types.SimpleNamespace(**{name: values.get(name, arg.default) for name, arg in self.args.items()})
