"""Every count and size option, checked where it is read with the same one-line error: each
declared bound refuses the values just outside it (0 and -1 for counts), in the dataclass and
on the command line, and a refusal writes nothing."""

from __future__ import annotations

import json

import pytest
from conftest import assert_one_line_error, run_dcpo

from dcpo_cli.errors import DcpoError
from dcpo_cli.fields import option_fields, spec_of
from dcpo_cli.run.config import SECTIONS

BOUNDED = [pytest.param(cls, field, id=f"{cls.__name__}.{field.name}")
           for cls in dict.fromkeys(SECTIONS.values()) for field in option_fields(cls)
           if spec_of(field).at_least is not None or spec_of(field).above is not None]


def test_the_counts_are_bounded():
    names = {param.values[1].name for param in BOUNDED}
    for count in ("steps", "batch_size", "n", "max_new_tokens", "epochs", "mini_batch_size",
                  "micro_batch_tokens", "nproc_per_node", "nnodes", "max_rounds", "avg_at",
                  "tensor_parallel_size", "workers", "lora_rank", "seed", "eval_every"):
        assert count in names, count


@pytest.mark.parametrize("cls, field", BOUNDED)
def test_every_bound_refuses_the_values_outside_it(cls, field):
    spec = spec_of(field)
    low = spec.at_least if spec.at_least is not None else spec.above
    # just below the bound (the bound itself when it is excluded), -1, and NaN for floats
    outside = {low - 1 if spec.at_least is not None else low, -1}
    if field.type in ("float", "float | None"):
        outside.add(float("nan"))
    for value in outside:
        with pytest.raises(DcpoError) as caught:
            cls(**{field.name: value}).check()
        assert str(caught.value).startswith(spec.flag(field.name) + " must be"), caught.value


def test_defaults_pass_their_checks():
    for cls in dict.fromkeys(SECTIONS.values()):
        cls().check()


@pytest.mark.parametrize("args, fragment", [
    (["--steps", "0"], "--steps must be at least 1"),
    (["--steps", "-1"], "--steps must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--n", "-1"], "--n must be at least 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--eval-every", "-1"], "--eval-every must be >= 0"),
    (["--nproc-per-node", "0"], "--nproc-per-node must be at least 1"),
    (["--nproc-per-node", "99"], "--nproc-per-node 99: this machine can run"),
    (["--set", "loop.max_rounds=0"], "--set loop.max_rounds: must be at least 1"),
])
@pytest.mark.slow
def test_dcpo_run_refuses_a_bad_count_and_writes_nothing(tmp_path, args, fragment):
    run_dir = tmp_path / "run"
    assert_one_line_error(run_dcpo("run", run_dir, *args), fragment)
    assert not run_dir.exists()


@pytest.mark.parametrize("args, fragment", [
    (["--steps", "-1"], "dcpo-s0: --steps must be at least 1"),
    (["--nproc-per-node", "0"], "dcpo-s0: --nproc-per-node must be at least 1"),
    (["--nproc-per-node", "99"], "--nproc-per-node 99: this machine can run"),
    (["--nproc-per-node", "2", "--batch-size", "3"], "--batch-size 3 does not split"),
    (["--seed", "-1"], "--seed must be at least 0"),
])
@pytest.mark.slow
def test_dcpo_study_refuses_a_bad_count_before_it_writes_or_starts(tmp_path, args, fragment):
    study_dir = tmp_path / "study"
    assert_one_line_error(run_dcpo("study", study_dir, "--algo", "dcpo", "--seeds", "1",
                                   *args), fragment)
    assert not study_dir.exists()


def test_a_hand_edited_study_json_with_bad_seeds_is_refused(tmp_path):
    study_dir = tmp_path / "study"
    study_dir.mkdir()
    path = study_dir / "study.json"
    for seeds in ([-1], [0, 0]):
        path.write_text(json.dumps({"algos": ["dcpo"], "seeds": seeds, "flags": {}, "set": {}}))
        assert_one_line_error(run_dcpo("study", study_dir), "study.json",
                              "seeds must be distinct and at least 0")
        assert sorted(p.name for p in study_dir.iterdir()) == ["study.json"]
