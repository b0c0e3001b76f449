"""The SAS state file: round trip, absorb-once, new prompt sets, and one-line refusals."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_dcpo

from dcpo_cli.core import algorithms as alg
from dcpo_cli.core.algorithms import PromptStats
from dcpo_cli.errors import DcpoError
from dcpo_cli.files.sas_state import SasState


def absorb_rewards(state: SasState, step: int, groups: dict[str, list[float]]) -> SasState:
    updates = {}
    for prompt_id, rewards in groups.items():
        _, updates[prompt_id] = alg.sas_advantages(torch.tensor(rewards, dtype=torch.float64),
                                                   state.get(prompt_id))
    return state.absorb(step, updates)


def test_missing_file_is_the_empty_state(tmp_path):
    state = SasState.load(tmp_path / "state.json")
    assert state.last_step is None and state.get("anything") is None


def test_round_trip_is_exact_and_byte_stable(tmp_path):
    state = absorb_rewards(SasState(), 0, {"b": [1.0, 0.0, 0.0], "a": [0.1, 0.7]})
    state = absorb_rewards(state, 3, {"a": [1.0, 1.0], "c": [0.0, 1.0]})
    path = tmp_path / "state.json"
    state.save(path)
    loaded = SasState.load(path)
    assert loaded == state  # floats survive JSON exactly
    assert loaded.last_step == 3 and loaded.get("a").times == 2 and loaded.get("b").times == 1
    again = tmp_path / "again.json"
    SasState(dict(reversed(list(loaded.prompts.items()))), 3).save(again)
    assert again.read_bytes() == path.read_bytes()  # key order does not leak into bytes
    data = json.loads(path.read_text())
    assert data["format"] == "dcpo-sas-state" and data["version"] == 1
    assert set(data["prompts"]["c"]) == {"times", "mean", "std"}


def test_absorb_refuses_the_same_or_an_older_step(tmp_path):
    state = absorb_rewards(SasState(), 5, {"p": [1.0, 0.0]})
    for step in (5, 4):
        with pytest.raises(DcpoError, match=r"state\.json: already absorbed step 5"):
            state.absorb(step, {}, tmp_path / "state.json")
    assert state.absorb(6, {}).last_step == 6
    assert state.get("p").times == 1  # absorb returns a new state, never mutates


def test_a_new_prompt_set_starts_empty_and_keeps_the_old_prompts():
    state = absorb_rewards(SasState(), 0, {"old": [1.0, 0.0]})
    state = absorb_rewards(state, 1, {"new": [1.0, 1.0, 0.0]})
    assert state.get("old") == PromptStats(1, 0.5, pytest.approx(0.5 ** 0.5))
    assert state.get("new").times == 1


@pytest.mark.parametrize(("content", "fragment"), [
    ("{not json", "not a readable SAS state file"),
    ('{"prompts": {}}', "not a SAS state file"),
    ('{"format": "dcpo-sas-state", "version": 7, "prompts": {}}', "version 7"),
    ('{"format": "dcpo-sas-state", "version": 1, "last_step": -1, "prompts": {}}',
     "last_step"),
    ('{"format": "dcpo-sas-state", "version": 1, "last_step": 0, "prompts": []}', "'prompts'"),
    ('{"format": "dcpo-sas-state", "version": 1, "last_step": 0,'
     ' "prompts": {"p": {"times": 0, "mean": 0.5, "std": 0.1}}}', "times"),
    ('{"format": "dcpo-sas-state", "version": 1, "last_step": 0,'
     ' "prompts": {"p": {"times": 1, "mean": "x", "std": 0.1}}}', "mean"),
    ('{"format": "dcpo-sas-state", "version": 1, "last_step": 0,'
     ' "prompts": {"p": {"times": 1, "mean": 0.5}}}', "times, mean, std"),
])
def test_corrupt_files_are_refused_naming_the_file(tmp_path, content, fragment):
    path = tmp_path / "state.json"
    path.write_text(content)
    with pytest.raises(DcpoError) as info:
        SasState.load(path)
    message = str(info.value)
    assert str(path) in message and fragment in message and "\n" not in message


def test_inspect_shows_the_state(tmp_path):
    path = tmp_path / "state.json"
    absorb_rewards(SasState(), 2, {"prompt-7": [1.0, 0.0, 1.0]}).save(path)
    result = run_dcpo("inspect", path)
    assert result.code == 0, result.stderr
    assert "prompt-7" in result.stdout
