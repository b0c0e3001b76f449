"""Options defined once: commands take their defaults from `dcpo_cli.options`, the sampling
settings are checked by one function, and the one JSONL reader keeps U+2028 inside lines."""

from __future__ import annotations

import inspect
import json

import pytest

from dcpo_cli.commands import eval_cmd, rollout_cmd, score_cmd, train_step_cmd
from dcpo_cli.core.presets import PRESETS
from dcpo_cli.errors import DcpoError
from dcpo_cli.files.jsonl import parse_jsonl
from dcpo_cli.options import (
    EvalOptions,
    RolloutOptions,
    ScoreOptions,
    TrainOptions,
    choices,
    from_values,
)


@pytest.mark.parametrize("command, options", [
    (rollout_cmd.rollout, RolloutOptions), (score_cmd.score, ScoreOptions),
    (eval_cmd.evaluate, EvalOptions), (train_step_cmd.train_step, TrainOptions)])
def test_every_command_default_is_its_options_default(command, options):
    defaults = options()
    shared = 0
    for name, parameter in inspect.signature(command).parameters.items():
        if name in ("shard", "pass_at"):
            continue  # parsed or reshaped by the command
        if hasattr(defaults, name) and parameter.default.default is not ...:
            assert parameter.default.default == getattr(defaults, name), name
            shared += 1
    assert shared >= 3


def test_from_values_picks_the_fields_and_applies_changes():
    values = {"lr": 0.5, "epochs": 3, "clip": "dac", "unrelated": object()}
    options = from_values(TrainOptions, values, overrides={"clip": "dac"})
    assert (options.lr, options.epochs, options.overrides) == (0.5, 3, {"clip": "dac"})
    assert options.warmup_steps == TrainOptions().warmup_steps


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
