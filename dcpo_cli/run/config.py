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

from dcpo_cli.engines.settings import EngineSettings, ServerAddress
from dcpo_cli.errors import DcpoError
from dcpo_cli.fields import Spec, hints, spec_of
from dcpo_cli.files import run_layout
from dcpo_cli.files.run_layout import CONFIG_FILE
from dcpo_cli.options import (
    EvalOptions,
    LaunchOptions,
    LoopOptions,
    RolloutOptions,
    ScoreOptions,
    TrainOptions,
)

SECTIONS: dict[str, type] = {"loop": LoopOptions, "launch": LaunchOptions,
                             "rollout": RolloutOptions, "score": ScoreOptions,
                             "train": TrainOptions, "eval": EvalOptions,
                             "engine": EngineSettings, "server": ServerAddress}
# Fields the loop sets itself from RUN_DIR's layout (or that one process cannot vary).
# The server's token is a secret: never in run.toml, always from DCPO_SERVER_TOKEN.
FIXED = {("rollout", "shard"), ("train", "metrics_log"), ("engine", "verbose"),
         ("server", "token")}
# Settings a re-run may change (the others must stay as the run was made): more steps, other
# trackers, another world size (the training state reshards).
CHANGEABLE = {("loop", "steps"), ("loop", "report_to"), ("launch", "nproc_per_node"),
              ("launch", "nnodes")}
# examples/tiny_loop.sh's settings where they differ from the stages' own defaults.
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "rollout": {"batch_size": 32, "n": 8, "max_new_tokens": 48, "engine": "hf"},
    "train": {"lr": 2e-4, "warmup_steps": 0},
    "eval": {"avg_at": 8, "max_new_tokens": 48, "engine": "hf"},
}


@dataclasses.dataclass(frozen=True)
class Shortcut:
    """A `dcpo run` flag for stage settings: the settings it sets ("section.field"; its type
    and help are the first one's declaration), its help panel, and help of its own where it
    sets several stages' settings."""

    targets: tuple[str, ...]
    panel: str
    help: str | None = None


SHORTCUTS: dict[str, Shortcut] = {
    "algo": Shortcut(("train.algo",), "Training"),
    "batch_size": Shortcut(("rollout.batch_size",), "Sampling"),
    "n": Shortcut(("rollout.n",), "Sampling"),
    "max_new_tokens": Shortcut(("rollout.max_new_tokens", "eval.max_new_tokens"), "Sampling",
                               "Longest response, rollouts and eval."),
    "temperature": Shortcut(("rollout.temperature",), "Sampling"),
    "lr": Shortcut(("train.lr",), "Training"),
    "warmup_steps": Shortcut(("train.warmup_steps",), "Training"),
    "seed": Shortcut(("rollout.seed", "train.seed", "eval.seed"), "Training",
                     "Seed of the tiny model, prompt order, sampling and mini-batches."),
    "reward": Shortcut(("score.reward",), "Training"),
    "eval_at": Shortcut(("eval.avg_at",), "Evaluation",
                        "K samples per test problem, avg@K."),
    "engine": Shortcut(("rollout.engine", "eval.engine"), "Engine",
                       "Generation engine: hf, vllm or server (rollouts and eval; server: a "
                       "running `dcpo serve` at --server-url, its token from "
                       "DCPO_SERVER_TOKEN)."),
    "server_url": Shortcut(("server.url",), "Engine"),
    "max_staleness": Shortcut(("train.max_staleness",), "Training",
                              "Overlap generation with training: step s trains on responses "
                              "sampled by the policy of step s - K, generated (in a worker "
                              "process) while step s - 1 trains; 0: one stage after another."),
    "lora_rank": Shortcut(("train.lora_rank",), "LoRA"),
    "lora_alpha": Shortcut(("train.lora_alpha",), "LoRA"),
    "lora_dropout": Shortcut(("train.lora_dropout",), "LoRA"),
    "lora_target_modules": Shortcut(("train.lora_target_modules",), "LoRA"),
}


def _flags() -> dict[str, tuple[tuple[str, str], ...]]:
    flags = {f.name: ((section, f.name),) for section in ("loop", "launch")
             for f in dataclasses.fields(SECTIONS[section]) if spec_of(f) and spec_of(f).cli}
    for flag, shortcut in SHORTCUTS.items():
        flags[flag] = tuple(tuple(target.split(".", 1)) for target in shortcut.targets)
    return flags


# The command's flags: flag -> the settings it sets (one flag may set several stages').
FLAGS: dict[str, tuple[tuple[str, str], ...]] = _flags()


def flag_declaration(flag: str) -> tuple[dataclasses.Field, Spec]:
    """The field a `dcpo run` flag takes its type and help from, and its spec for the flag
    (a shortcut's panel and help)."""
    section, name = FLAGS[flag][0]
    field = next(f for f in dataclasses.fields(SECTIONS[section]) if f.name == name)
    spec = spec_of(field)
    shortcut = SHORTCUTS.get(flag)
    if shortcut is not None:
        spec = dataclasses.replace(spec, panel=shortcut.panel, help=shortcut.help or spec.help,
                                   flags=(f"--{flag.replace('_', '-')}",))
    return field, spec


Config = dict[str, dict[str, Any]]


def default_config() -> Config:
    config: Config = {}
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
    hint = hints(SECTIONS[section])[name]
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
    if origin is list or (origin is tuple and len(args) == 2 and args[1] is Ellipsis):
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
