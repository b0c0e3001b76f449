"""`dcpo run`'s configuration: RUN_DIR/run.toml, written on the first run, read by every
re-run (which then needs no flags), and the refusal of a re-run that asks for something else.

The file has a `[loop]` table (model, prompts, steps, evaluation cadence) and one table per
stage holding every field of that stage's options dataclass (`[rollout]` RolloutOptions,
`[score]` ScoreOptions, `[train]` TrainOptions, `[eval]` EvalOptions, `[engine]`
EngineSettings), read and written generically: a field added to a dataclass is a key here
with no change to this module, and `--set train.FIELD=VALUE` sets it from the command line.
The defaults are those of examples/tiny_loop.sh, so `dcpo run RUN --steps N` is the shell
loop's run. Torch-free: the command checks its flags before anything heavy is imported.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from dcpo_cli.engines.settings import EngineSettings
from dcpo_cli.errors import DcpoError
from dcpo_cli.files import run_layout
from dcpo_cli.files.run_layout import CONFIG_FILE
from dcpo_cli.options import EvalOptions, RolloutOptions, ScoreOptions, TrainOptions

SECTIONS: dict[str, type] = {"rollout": RolloutOptions, "score": ScoreOptions,
                             "train": TrainOptions, "eval": EvalOptions,
                             "engine": EngineSettings}
# Fields the loop sets itself from RUN_DIR's layout (or that one process cannot vary).
FIXED = {("rollout", "shard"), ("train", "metrics_log"), ("engine", "verbose")}
# The [loop] table: what the shell loop takes as arguments and environment.
LOOP_DEFAULTS: dict[str, Any] = {
    "model": None,  # None: the built-in tiny model, built into RUN_DIR/tiny
    "prompts": None,  # None: RUN_DIR/tiny/train.parquet
    "benchmark": [],  # [] with the tiny model: RUN_DIR/tiny/test.parquet
    "tiny_size": "default",
    "steps": 20,
    "eval_every": 0,  # also evaluate every K steps (0: only before and after, as the script)
    "max_rounds": 4,  # DAPO's refill: rollout rounds per step at most (the script's MAX_ROUNDS)
    "report_to": [],  # experiment trackers (--report-to); a re-run may change them
}
# [loop] settings a re-run may change (the others must stay as the run was made).
CHANGEABLE = {("loop", "steps"), ("loop", "report_to")}
# examples/tiny_loop.sh's settings where they differ from the stages' own defaults.
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "rollout": {"batch_size": 32, "n": 8, "max_new_tokens": 48, "engine": "hf"},
    "train": {"lr": 2e-4, "warmup_steps": 0},
    "eval": {"avg_at": 8, "max_new_tokens": 48, "engine": "hf"},
}
# The command's flags: flag -> the settings it sets (one flag may set several stages').
FLAGS: dict[str, tuple[tuple[str, str], ...]] = {
    "model": (("loop", "model"),),
    "prompts": (("loop", "prompts"),),
    "benchmark": (("loop", "benchmark"),),
    "tiny_size": (("loop", "tiny_size"),),
    "steps": (("loop", "steps"),),
    "eval_every": (("loop", "eval_every"),),
    "algo": (("train", "algo"),),
    "batch_size": (("rollout", "batch_size"),),
    "n": (("rollout", "n"),),
    "max_new_tokens": (("rollout", "max_new_tokens"), ("eval", "max_new_tokens")),
    "temperature": (("rollout", "temperature"),),
    "lr": (("train", "lr"),),
    "warmup_steps": (("train", "warmup_steps"),),
    "seed": (("rollout", "seed"), ("train", "seed"), ("eval", "seed")),
    "eval_at": (("eval", "avg_at"),),
    "engine": (("rollout", "engine"), ("eval", "engine")),
    "reward": (("score", "reward"),),
    "lora_rank": (("train", "lora_rank"),),
    "lora_alpha": (("train", "lora_alpha"),),
    "lora_dropout": (("train", "lora_dropout"),),
    "lora_target_modules": (("train", "lora_target_modules"),),
    "report_to": (("loop", "report_to"),),
}
# The [loop] table's types (the stages' tables take their dataclass's annotations).
LOOP_TYPES: dict[str, Any] = {"model": str | None, "prompts": str | None,
                              "benchmark": list[str], "tiny_size": str, "steps": int,
                              "eval_every": int, "max_rounds": int, "report_to": list[str]}
Config = dict[str, dict[str, Any]]


def default_config() -> Config:
    config: Config = {"loop": dict(LOOP_DEFAULTS)}
    for section, cls in SECTIONS.items():
        values = {f.name: _plain(getattr(cls(), f.name)) for f in dataclasses.fields(cls)
                  if (section, f.name) not in FIXED}
        config[section] = {**values, **STAGE_DEFAULTS.get(section, {})}
    return config


def parse_set(items: list[str]) -> dict[tuple[str, str], Any]:
    """`--set SECTION.FIELD=VALUE` (VALUE read as JSON where it parses, else a string)."""
    known = default_config()
    settings = {}
    for item in items:
        key, sep, text = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot:
            raise DcpoError(f"--set {item!r}: expected SECTION.FIELD=VALUE, e.g. "
                            "train.weight_decay=0.0")
        if section not in known or name not in known[section]:
            raise DcpoError(f"--set {key}: no such setting (sections: "
                            f"{', '.join(known)}; see {CONFIG_FILE} for the fields)")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        wrong = type_error(section, name, value)
        if wrong:
            raise DcpoError(f"--set {key}={text}: {wrong}")
        settings[(section, name)] = value
    return settings


def type_error(section: str, name: str, value: Any) -> str | None:
    """What is wrong with the type of `value` for SECTION.FIELD, or None when it fits (so a
    wrong type is one line naming the field, not a TypeError deep in a stage)."""
    hint = LOOP_TYPES[name] if section == "loop" else \
        typing.get_type_hints(SECTIONS[section])[name]
    return None if _fits(value, hint) else f"expected {_describe(hint)}, got {_show(value)}"


def _fits(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if hint is Any:
        return True
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint in (str, Path):
        return isinstance(value, str)
    if origin is dict:
        return isinstance(value, dict)
    if origin is list:
        return isinstance(value, list) and all(_fits(v, args[0]) for v in value)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis and typing.get_origin(args[0]) is tuple:
            return isinstance(value, dict) or value == []  # (key, value) pairs: a table
        if isinstance(value, list):
            if len(args) == 2 and args[1] is Ellipsis:
                return all(_fits(v, args[0]) for v in value)
            return len(value) == len(args) and all(map(_fits, value, args))
        return False
    return True  # a type this check does not know: the stage's own check decides


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in args if arg is not type(None))
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
             Path: "a path (a string)"}
    if hint in names:
        return names[hint]
    if origin is dict or (origin is tuple and len(args) == 2 and args[1] is Ellipsis
                          and typing.get_origin(args[0]) is tuple):
        return "a table"
    plural = {int: "integers", float: "numbers", str: "strings"}
    if origin is list:
        return f"a list of {plural.get(args[0], 'values')}"
    if origin is tuple:
        return f"a list of {len(args)} {plural.get(args[0], 'values')}"
    return str(hint)


def given_flags(values: dict[str, Any]) -> dict[str, Any]:
    """The settings flags `dcpo run` was given (flag name -> value), from its keyword values:
    None or an empty list means "not given"; `--report-to none` is a given empty list."""
    values = dict(values)
    if values.get("report_to"):
        from dcpo_cli.options import report_to as tracker_names

        values["report_to"] = tracker_names(values["report_to"]) or ["none"]
    return {name: values[name] for name in FLAGS if values.get(name) not in (None, [])}


def resolve_values(run_dir: Path, values: dict[str, Any]) -> tuple[Config, bool]:
    """`resolve` from `dcpo run`'s keyword values (its flags and `set_`, the --set list)."""
    return resolve(run_dir, given_flags(values), parse_set(values.get("set_") or []))


def resolve(run_dir: Path, given: dict[str, Any], sets: dict[tuple[str, str], Any]
            ) -> tuple[Config, bool]:
    """The run's configuration and whether run.toml must be (re)written. `given`: the flags
    the user passed (flag name -> value), `sets`: the --set settings. A RUN_DIR made with
    other settings is refused, naming the first differing one; --steps may change."""
    requested = _requested(given, sets)
    path = run_layout.config_file(run_dir)
    if not path.is_file():
        return new_config(given, sets), True
    stored = read_config(path)
    for (section, name), value in requested.items():
        if (section, name) in CHANGEABLE:
            continue
        if not _same(stored[section].get(name), _plain(value)):
            raise DcpoError(f"{path}: this run was made with {section}.{name} = "
                            f"{_show(stored[section].get(name))}, not {_show(_plain(value))} "
                            f"({flag_of(section, name, given)}); use the same settings or "
                            "another RUN_DIR")
    rewrite = False
    for section, name in sorted(CHANGEABLE):
        value = requested.get((section, name))
        if value is not None and not _same(stored[section][name], _plain(value)):
            stored[section][name] = _plain(value)
            rewrite = True
    return stored, rewrite


def _requested(given: dict[str, Any], sets: dict[tuple[str, str], Any]
               ) -> dict[tuple[str, str], Any]:
    requested = {(s, f): value for flag, value in given.items() for s, f in FLAGS[flag]}
    requested.update(sets)
    return requested


def new_config(given: dict[str, Any], sets: dict[tuple[str, str], Any]) -> Config:
    """The configuration a first `dcpo run` with these flags and --set settings writes."""
    requested = _requested(given, sets)
    config = default_config()
    for (section, name), value in requested.items():
        config[section][name] = _plain(value)
    if config["train"]["algo"] == "dcpo" and not config["score"]["reward"] \
            and ("score", "no_answer_reward") not in requested:
        # as examples/tiny_loop.sh: the official DCPO reward, 1 / 0 / -1
        config["score"]["no_answer_reward"] = -1.0
    if refills(config) and ("train", "target_prompts") not in requested:
        # as examples/tiny_loop.sh with ALGO=dapo: TARGET is the batch size
        config["train"]["target_prompts"] = config["rollout"]["batch_size"]
    return config


def flag_of(section: str, name: str, given: dict[str, Any]) -> str:
    """The option that set `section.name`: a flag among those `given`, else --set."""
    return next((f"--{flag.replace('_', '-')}" for flag, targets in FLAGS.items()
                 if (section, name) in targets and flag in given), f"--set {section}.{name}")


def first_difference(a: Config, b: Config) -> tuple[str, str] | None:
    """The first (section, field) whose value differs between two configurations."""
    for section, values in a.items():
        for name in sorted(set(values) | set(b.get(section, {}))):
            if not _same(values.get(name), b.get(section, {}).get(name)):
                return section, name
    return None


def show(value: Any) -> str:
    return _show(value)


def refills(config: Config) -> bool:
    """Whether each step samples DAPO's refill rounds: the training drops groups whose
    responses all agree (the dapo preset, or train.overrides)."""
    from dcpo_cli.core.presets import resolve_config

    train = config["train"]
    return resolve_config(train["algo"], **dict(train["overrides"] or {})).drop_uniform_groups


def read_config(path: Path) -> Config:
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise DcpoError(f"{path}: unreadable ({' '.join(str(exc).split())})") from None
    config = default_config()
    for section, values in data.items():
        if section not in config or not isinstance(values, dict):
            raise DcpoError(f"{path}: unknown table [{section}]")
        for name, value in values.items():
            if name not in config[section]:
                raise DcpoError(f"{path}: [{section}] has no setting {name!r}")
            wrong = type_error(section, name, value)
            if wrong:
                raise DcpoError(f"{path}: [{section}] {name}: {wrong}")
            config[section][name] = value
    return config


def write_config(config: Config, path: Path) -> None:
    from dcpo_cli.files.contracts import atomic_path

    lines = ["# dcpo run: the settings of this run directory (a re-run reads them; see",
             "# `dcpo run --help`). Unset optional settings are left out."]
    for section, values in config.items():
        lines += ["", f"[{section}]"]
        lines += [f"{name} = {_toml_value(value)}" for name, value in values.items()
                  if value is not None]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def stage_options(config: Config, section: str, **fixed: Any):
    """The stage's options dataclass from its table (+ the loop's `fixed` fields)."""
    cls = SECTIONS[section]
    types = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for name, value in config[section].items():
        default = getattr(cls(), name)
        if isinstance(default, tuple) and isinstance(value, dict):
            value = tuple(value.items())  # EngineSettings.engine_args: (key, value) pairs
        elif isinstance(default, tuple) and isinstance(value, list):
            value = tuple(value)
        values[name] = value
    unknown = set(values) - set(types)
    assert not unknown, unknown
    return cls(**{**values, **fixed})


def _plain(value: Any) -> Any:
    """A TOML-able value: tuples of pairs become tables, other tuples lists, paths strings."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        if all(isinstance(v, tuple) and len(v) == 2 for v in value) and value:
            return {str(k): _plain(v) for k, v in value}
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def _show(value: Any) -> str:
    return "unset" if value is None else _toml_value(value)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value if v is not None) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()
                               if v is not None) + "}"
    raise DcpoError(f"{CONFIG_FILE}: cannot store {value!r} ({type(value).__name__})")
