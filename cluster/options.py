"""The configuration schema's building blocks: an option is a dataclass field that carries its help
text and bounds, so that one declaration gives the default, the CLI flag (deploy/cli/flags.py), the
RayService application argument (deploy/app.py) and the check of a value (`check_options`).

    @dataclass(frozen=True)
    class EngineConfig:
        max_num_seqs: int = option(64, "running sequences per attention replica", ge=1)

Choices are written as `Literal[...]` types, so the type says what is allowed and every reader
(argparse, pydantic, the check here) takes them from there.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union, get_args, get_origin

# What an option may hold (the annotations of the config classes use these types only).
OptionValue = Union[str, int, float, bool, tuple[int, ...], dict[str, float], None]


def option(default: Any, help: str, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
           secret: bool = False) -> Any:
    """A config field. Mutable defaults (dicts) are copied per instance. `secret` keeps the value out of
    logs, help output and generated schemas."""
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "secret": secret}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class OptionSpec:
    """One option as the flag and argument generators see it."""

    name: str
    owner: type  # the config dataclass that declares it
    type: Any  # the resolved annotation, e.g. int | None, Literal["a", "b"], dict[str, float]
    default: Any
    help: str
    ge: float | None
    gt: float | None
    le: float | None
    secret: bool

    @property
    def optional(self) -> bool:
        return type(None) in get_args(self.type) if get_origin(self.type) in (Union, _UnionType) else False

    @property
    def base(self) -> Any:
        """The type without `| None`."""
        if get_origin(self.type) in (Union, _UnionType):
            rest = [a for a in get_args(self.type) if a is not type(None)]
            return rest[0] if len(rest) == 1 else Union[tuple(rest)]
        return self.type

    @property
    def choices(self) -> tuple[Any, ...] | None:
        return get_args(self.base) if get_origin(self.base) is Literal else None


_UnionType = type(int | None)


@functools.cache
def options_of(cls: type) -> tuple[OptionSpec, ...]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata:
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        m = f.metadata
        out.append(OptionSpec(f.name, cls, hints[f.name], default, m["help"], m["ge"], m["gt"], m["le"], m["secret"]))
    return tuple(out)


def schema(*classes: type) -> tuple[OptionSpec, ...]:
    """The options of several config classes as one flat namespace (names must not repeat)."""
    out = [o for cls in classes for o in options_of(cls)]
    names = [o.name for o in out]
    if len(names) != len(set(names)):
        raise TypeError(f"option names repeat across {[c.__name__ for c in classes]}")
    return tuple(out)


def check_options(obj: Any) -> None:
    """Raise ValueError naming the first option of `obj` outside its bounds or choices."""
    for o in options_of(type(obj)):
        value = getattr(obj, o.name)
        if value is None and o.optional:
            continue
        if o.choices is not None and value not in o.choices:
            raise ValueError(f"{o.name} must be one of {', '.join(map(str, o.choices))}, not {value!r}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            for bound, ok, word in ((o.ge, lambda v, b: v >= b, ">="), (o.gt, lambda v, b: v > b, ">"),
                                    (o.le, lambda v, b: v <= b, "<=")):
                if bound is not None and not ok(value, bound):
                    raise ValueError(f"{o.name} must be {word} {bound:g}, not {value!r}")


def split_values(values: dict[str, OptionValue], *classes: type) -> list[Any]:
    """Flat {option name: value} -> one instance per class (absent names keep their defaults).
    Unknown names raise ValueError."""
    known = {o.name for o in schema(*classes)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown options: {', '.join(unknown)}")
    return [cls(**{o.name: values[o.name] for o in options_of(cls) if o.name in values}) for cls in classes]


def flat_values(*configs: object) -> dict[str, OptionValue]:
    """The inverse of split_values."""
    return {o.name: getattr(c, o.name) for c in configs for o in options_of(type(c))}
