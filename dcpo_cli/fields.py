"""How an option is declared: once, as a dataclass field carrying its help, panel, flag
names and bounds (`option(...)`), from which the command-line signature (commands/declared.py),
run.toml and `--set` (run/config.py) and the checks below all follow.

A failed check is an `OptionError`: it knows its field, so the command line words it as a
flag (`--batch-size must be at least 1`) and run.toml as a table entry (`run.toml: [rollout]
batch_size must be at least 1`), each from the same error. Standard library only.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dcpo_cli.errors import DcpoError


@dataclass(frozen=True)
class Spec:
    """What the command line and the help show of one field."""

    help: str
    panel: str | None = None  # the --help panel (None: "Options")
    flags: tuple[str, ...] = ()  # e.g. ("--chat-template/--no-chat-template",); () = --name
    metavar: str | None = None
    envvar: str | None = None
    cli: bool = True  # False: a setting of files only (run.toml, --set), not a flag
    at_least: float | None = None
    above: float | None = None
    at_most: float | None = None
    choices: tuple[str, ...] | None = None
    finite: bool = False
    # the command line's own type and reading of the value (e.g. shard "i/n" -> (i, n))
    cli_type: Any = None
    cli_default: Any = None  # with cli_type: the command line's default
    parse: Callable[[Any], Any] | None = None

    def flag(self, name: str) -> str:
        return self.flags[0].split("/")[0] if self.flags else "--" + name.replace("_", "-")


def option(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = None,
           **spec: Any) -> Any:
    """A dataclass field declared as an option (see `Spec` for the keywords)."""
    metadata = {"option": Spec(help=help, **spec)}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def new_default(base: type, name: str, default: Any) -> Any:
    """`base`'s option `name`, declared there, with another default in a subclass."""
    return dataclasses.field(default=default, metadata=base.__dataclass_fields__[name].metadata)


@functools.cache
def hints(cls: type) -> dict[str, Any]:
    """`cls`'s field types, resolved once (`dcpo --help` builds every command from them)."""
    return typing.get_type_hints(cls)


def spec_of(field: dataclasses.Field) -> Spec | None:
    return field.metadata.get("option")


def option_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if spec_of(f) is not None]


def default_of(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


class OptionError(DcpoError):
    """A value that fails its option's check. `str()` speaks of the flag; `in_file` of the
    field in a settings file."""

    def __init__(self, name: str, problem: str, flag: str | None = None) -> None:
        self.name, self.problem = name, problem
        self.flag = flag or "--" + name.replace("_", "-")
        super().__init__(f"{self.flag} {problem}")

    def in_file(self, path: Any, section: str) -> DcpoError:
        return DcpoError(f"{path}: [{section}] {self.name} {self.problem}")


def choices(names) -> str:
    """A choice list for help texts and error messages: 'a, b or c'."""
    names = list(names)
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def _number(value: Any) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def problem_with(spec: Spec, value: Any) -> str | None:
    """What is wrong with `value` by `spec`'s bounds and choices, or None."""
    if value is None:
        return None
    if spec.choices is not None and value not in spec.choices:
        return f"must be {choices(spec.choices)}, not {value!r}"
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    if spec.finite and not math.isfinite(value):
        return f"must be a finite number (got {value})"
    if spec.above is not None and spec.at_most is not None and \
            not spec.above < value <= spec.at_most:
        return f"must be in ({_number(spec.above)}, {_number(spec.at_most)}] (got {value})"
    if spec.at_least is not None and not value >= spec.at_least:
        bound = ">= 0" if spec.at_least == 0 else f"at least {_number(spec.at_least)}"
        return f"must be {bound} (got {value})"
    if spec.above is not None and not value > spec.above:
        return f"must be > {_number(spec.above)} (got {value})"
    if spec.at_most is not None and not value <= spec.at_most:
        return f"must be at most {_number(spec.at_most)} (got {value})"
    return None


def check_fields(obj: Any) -> None:
    """Every declared field of `obj` against its bounds and choices (the first failure)."""
    for field in option_fields(type(obj)):
        spec = spec_of(field)
        problem = problem_with(spec, getattr(obj, field.name))
        if problem:
            raise OptionError(field.name, problem, spec.flag(field.name))


def fail(cls: type, name: str, problem: str) -> OptionError:
    """An OptionError for field `name` of `cls` (its own flag name)."""
    spec = next((spec_of(f) for f in dataclasses.fields(cls) if f.name == name), None)
    return OptionError(name, problem, spec.flag(name) if spec else None)
