"""Options declared once: each is a dataclass field (options.py, engines/settings.py) from
which the commands' signatures, run.toml, `--set`, `dcpo run`'s and `dcpo study`'s flags
and the checks all follow; and the one JSONL reader keeps U+2028 inside lines."""

from __future__ import annotations

import dataclasses
import inspect
import json

import pytest

from dcpo_cli.commands import (
    eval_cmd,
    export_cmd,
    rollout_cmd,
    run_cmd,
    score_cmd,
    serve_cmd,
    study_cmd,
    train_step_cmd,
)
from dcpo_cli.core.presets import PRESETS
from dcpo_cli.engines.settings import EngineSettings, ServerAddress
from dcpo_cli.errors import DcpoError
from dcpo_cli.fields import default_of, option_fields, spec_of
from dcpo_cli.files.jsonl import parse_jsonl
from dcpo_cli.options import (
    AlgoOverrides,
    EvalOptions,
    LoadOptions,
    RolloutOptions,
    ScoreOptions,
    TrackerOptions,
    TrainOptions,
    choices,
)
from dcpo_cli.run.config import FIXED, FLAGS, SECTIONS, STAGE_DEFAULTS, default_config, parse_set

COMMANDS = {
    "rollout": (rollout_cmd.rollout, (RolloutOptions, EngineSettings, ServerAddress,
                                      LoadOptions)),
    "score": (score_cmd.score, (ScoreOptions,)),
    "eval": (eval_cmd.evaluate, (EvalOptions, TrackerOptions, EngineSettings, ServerAddress,
                                 LoadOptions)),
    "train-step": (train_step_cmd.train_step, (TrainOptions, AlgoOverrides, TrackerOptions,
                                               LoadOptions)),
    "serve": (serve_cmd.serve, (EngineSettings,)),
    "export": (export_cmd.export, (LoadOptions,)),
}


def flag_names(parameter) -> list[str]:
    decls = parameter.default.param_decls or ("--" + parameter.name.replace("_", "-"),)
    return [name for decl in decls for name in decl.split("/")]


@pytest.mark.parametrize("name", COMMANDS)
def test_every_declared_option_is_a_flag_of_its_commands_with_its_default(name):
    command, groups = COMMANDS[name]
    params = inspect.signature(command).parameters
    for cls in groups:
        for field in option_fields(cls):
            spec = spec_of(field)
            if not spec.cli:
                assert field.name not in params
                continue
            parameter = params[field.name]
            assert parameter.default.help == spec.help, field.name
            assert flag_names(parameter)[0] == spec.flag(field.name)
            default = spec.cli_default if spec.cli_type else default_of(field)
            assert parameter.default.default == (list(default) if default == () else default)


@pytest.mark.parametrize("section, cls", SECTIONS.items())
def test_every_field_of_a_section_is_in_run_toml_and_settable_with_set(section, cls):
    config = default_config()
    for field in dataclasses.fields(cls):
        if (section, field.name) in FIXED:
            assert field.name not in config[section]
            continue
        expected = STAGE_DEFAULTS.get(section, {}).get(field.name, default_of(field))
        stored = config[section][field.name]
        assert stored == (list(expected) if isinstance(expected, tuple) else expected)
        value = json.dumps(stored) if stored is not None else "null"
        assert parse_set([f"{section}.{field.name}={value}"]) == {(section, field.name): stored}


def test_dcpo_run_and_study_take_every_run_flag_from_its_declaration():
    from dcpo_cli.run.config import flag_declaration

    run_params = inspect.signature(run_cmd.run).parameters
    study_params = inspect.signature(study_cmd.study).parameters
    for flag in FLAGS:
        _, spec = flag_declaration(flag)
        assert run_params[flag].default.default is None  # "not given"
        assert run_params[flag].default.help.startswith(spec.help.rstrip("."))
        if flag not in ("algo", "seed"):  # the study's own versions replace these
            assert study_params[flag].default.help == run_params[flag].default.help
    # every [loop] and [launch] field that is a flag at all is one of dcpo run's
    for section in ("loop", "launch"):
        for field in option_fields(SECTIONS[section]):
            assert (field.name in FLAGS) == spec_of(field).cli


def test_a_new_field_becomes_a_flag_run_toml_entry_and_set_key(monkeypatch):
    """The README's Extending example: one declaration reaches every place."""
    from dcpo_cli.commands.declared import command
    from dcpo_cli.fields import option

    @dataclasses.dataclass
    class Extended(TrainOptions):
        entropy_bonus: float = option(0.0, "Entropy bonus coefficient.", at_least=0)

    seen = {}
    extended = command(lambda *, options: seen.setdefault("options", options), options=Extended)
    parameter = inspect.signature(extended).parameters["entropy_bonus"]
    assert parameter.default.help == "Entropy bonus coefficient."
    extended(**{name: p.default.default for name, p in
                inspect.signature(extended).parameters.items()} | {"entropy_bonus": 0.5})
    assert seen["options"].entropy_bonus == 0.5
    monkeypatch.setitem(SECTIONS, "train", Extended)
    assert default_config()["train"]["entropy_bonus"] == 0.0
    assert parse_set(["train.entropy_bonus=0.25"]) == {("train", "entropy_bonus"): 0.25}
    with pytest.raises(DcpoError, match="--entropy-bonus must be >= 0"):
        Extended(entropy_bonus=-1.0).check()


@pytest.mark.parametrize("field, value, message", [
    ("temperature", -1.0, "--temperature must be >= 0"),
    ("top_p", 1.5, "--top-p must be in (0, 1]"),
    ("top_k", -2, "--top-k must be >= 0"),
    ("max_new_tokens", 0, "--max-new-tokens must be at least 1")])
def test_rollout_and_eval_reject_bad_sampling_with_the_same_message(field, value, message):
    for options in (RolloutOptions(**{field: value}), EvalOptions(**{field: value})):
        with pytest.raises(DcpoError) as caught:
            options.check()
        assert str(caught.value).startswith(message)


def test_help_lists_the_presets_from_their_one_definition():
    assert choices(PRESETS) == "dcpo, grpo, dapo or gspo"
    help_text = inspect.signature(train_step_cmd.train_step).parameters["algo"].default.help
    assert choices(PRESETS) in help_text


def test_jsonl_keeps_unicode_line_separators_inside_strings():
    text = json.dumps({"note": "a\u2028b"}, ensure_ascii=False) + "\n\n" + '{"x": 1}\n'
    assert parse_jsonl(text, "f.jsonl") == [{"note": "a\u2028b"}, {"x": 1}]
    with pytest.raises(DcpoError, match="f.jsonl line 2: expected a JSON object, got list"):
        parse_jsonl('{"a": 1}\n[1]\n', "f.jsonl")
