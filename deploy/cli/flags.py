"""Command-line flags generated from the configuration schema (cluster/options.py).

Every option becomes `--name-with-dashes` (a trailing `_s` of seconds dropped: `step_timeout_s` is
`--step-timeout`). Flags carry no argparse default: an option the user did not give is absent from
the namespace, and the dataclass default applies, so each default has one source. Choices are
checked by the config classes themselves (one message, also for application args), not by argparse.
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Iterable

from cluster.options import OptionSpec, OptionValue, schema


def flag_name(name: str) -> str:
    return "--" + (name[:-2] if name.endswith("_s") else name).replace("_", "-")


def int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def resources(text: str) -> dict[str, float]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict) or not all(isinstance(v, (int, float)) for v in value.values()):
        raise argparse.ArgumentTypeError(f'expected a JSON object of resource amounts, e.g. {{"gpu_node": 1}}, '
                                         f"got {text!r}")
    return {str(k): float(v) for k, v in value.items()}


def _argument(o: OptionSpec, default: OptionValue) -> dict[str, Any]:  # argparse's keyword arguments
    shown = "" if default in (None, {}) else f" (default: {default})"
    kwargs: dict[str, Any] = {"dest": o.name, "default": argparse.SUPPRESS, "help": o.help + shown}
    base = o.base
    if base is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif o.choices is not None:
        kwargs.update(type=type(o.choices[0]), metavar="{" + ",".join(map(str, o.choices)) + "}")
    elif base in (int, float, str):
        kwargs["type"] = base
    elif base == tuple[int, ...]:
        kwargs.update(type=int_list, metavar="A,B,...")
    elif base == dict[str, float]:
        kwargs.update(type=resources, metavar="JSON")
    else:
        raise TypeError(f"no flag type for option {o.name}: {o.type}")
    return kwargs


def add_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, classes: Iterable[type], *,
                skip: Iterable[str] = (), defaults: dict[str, OptionValue] | None = None,
                required: Iterable[str] = ()) -> None:
    """One flag per option of `classes`; `defaults` are this command's own defaults (shown in help and
    applied by read_options), `required` options must be given."""
    defaults, skip, required = defaults or {}, set(skip), set(required)
    for o in schema(*classes):
        if o.name in skip:
            continue
        kwargs = _argument(o, defaults.get(o.name, o.default))
        if o.name in required:
            kwargs.update(required=True)
        parser.add_argument(flag_name(o.name), **kwargs)


def read_options(args: argparse.Namespace, classes: Iterable[type], defaults: dict[str, OptionValue] | None = None,
                 skip: Iterable[str] = ()) -> dict[str, OptionValue]:
    """{option name: value} for the options given on the command line, plus this command's defaults."""
    names = [o.name for o in schema(*classes) if o.name not in set(skip)]
    values = {name: value for name, value in (defaults or {}).items() if name in names}
    values.update({name: getattr(args, name) for name in names if hasattr(args, name)})
    return values
