"""Typer commands whose options come from the dataclasses that declare them (options.py).

`command(body, options=RolloutOptions, engine=EngineSettings)` returns a function typer can
read: its signature is `body`'s own parameters (paths, arguments) followed by one typer
option per declared field of each dataclass, with the field's default, flag names, help and
help panel. Called, it builds each dataclass from its fields' values and passes the object
to `body` under the group's name. So an option is declared once, as a field, and every
command that takes its dataclass has it, with the same name, default and help.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Any

import typer

from dcpo_cli.fields import Spec, default_of, hints, option_fields, spec_of


def typer_option(name: str, hint: Any, spec: Spec, default: Any) -> inspect.Parameter:
    """One keyword-only parameter with its typer declaration."""
    declaration = typer.Option(default, *spec.flags, help=spec.help, rich_help_panel=spec.panel,
                               metavar=spec.metavar, envvar=spec.envvar)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=declaration,
                             annotation=spec.cli_type or hint)


def field_parameters(cls: type) -> list[inspect.Parameter]:
    """The command-line parameters of `cls`'s declared fields."""
    types = hints(cls)
    params = []
    for field in option_fields(cls):
        spec = spec_of(field)
        if not spec.cli:
            continue
        if spec.cli_type is not None:
            default = spec.cli_default
        else:
            default = default_of(field)
            if isinstance(default, tuple) and not default:
                default = []
        params.append(typer_option(field.name, spec.cli_type or types[field.name],
                                   dataclasses.replace(spec, cli_type=None), default))
    return params


def build(cls: type, values: dict[str, Any]) -> Any:
    """An instance of `cls` from command-line values (the others keep their defaults)."""
    kwargs = {}
    for field in option_fields(cls):
        if field.name not in values:
            continue
        value = values[field.name]
        spec = spec_of(field)
        if spec.parse is not None and value is not None:
            value = spec.parse(value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[field.name] = value
    return cls(**kwargs)


def command(body: Callable, **groups: type) -> Callable:
    """A typer command: `body`'s own parameters, then every declared field of each group's
    dataclass; `body` receives the dataclass objects under the groups' names."""
    own = [p for name, p in inspect.signature(body).parameters.items() if name not in groups]
    taken = {p.name for p in own}
    generated = []
    for cls in groups.values():
        for param in field_parameters(cls):
            if param.name in taken:
                raise TypeError(f"{body.__name__}: option {param.name} declared twice")
            taken.add(param.name)
            generated.append(param)

    @functools.wraps(body)
    def wrapper(**values: Any) -> Any:
        objects = {group: build(cls, values) for group, cls in groups.items()}
        names = {f.name for cls in groups.values() for f in option_fields(cls)}
        rest = {k: v for k, v in values.items() if k not in names}
        return body(**rest, **objects)

    parameters = sorted(own, key=lambda p: p.kind) + generated
    wrapper.__signature__ = inspect.Signature(parameters)
    wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
    del wrapper.__wrapped__  # typer reads __signature__, not body's own
    return wrapper


def panels(function: Callable, order: tuple[str, ...],
           moves: dict[str, tuple[str, ...]] | None = None) -> Callable:
    """The order of a command's help panels, and options moved to another panel
    ({panel: names}) where this command shows them elsewhere than their declaration."""
    params = inspect.signature(function).parameters
    for title, names in (moves or {}).items():
        for name in names:
            params[name].default.rich_help_panel = title
    function.dcpo_panel_order = order
    return function
