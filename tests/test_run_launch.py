"""run.toml keeps `dcpo run`'s launch: a re-run without flags starts as many processes as
the run was made with; another world size given explicitly goes on there, said in one line."""

from __future__ import annotations

import pytest

from dcpo_cli.errors import DcpoError
from dcpo_cli.run.config import CONFIG_FILE, read_config
from dcpo_cli.run.start import Invocation, plan_run


def plan(run_dir, **given):
    return plan_run(run_dir, {"tiny_size": "test", "batch_size": 4, "n": 2, **given}, [],
                    Invocation())


def test_a_re_run_without_flags_keeps_the_launch(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    run_dir = tmp_path / "run"
    first = plan(run_dir, nproc_per_node=2)
    assert first.launch.nproc_per_node == 2 and first.settings.world_size == 2
    from dcpo_cli.run.config import write_config

    write_config(first.settings.config, run_dir / CONFIG_FILE)  # what start_run writes
    assert read_config(run_dir / CONFIG_FILE)["launch"]["nproc_per_node"] == 2
    again = plan_run(run_dir, {}, [], Invocation())
    assert again.launch.nproc_per_node == 2 and not again.rewrite
    assert capsys.readouterr().err == ""
    fewer = plan_run(run_dir, {"nproc_per_node": 1}, [], Invocation())
    assert fewer.launch.nproc_per_node == 1 and fewer.rewrite
    message = capsys.readouterr().err.strip().splitlines()
    assert message == [f"{run_dir}: made on 2 processes, continuing on 1 process (the training "
                       "state reshards)"]


def test_node_flags_need_a_launch(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(DcpoError, match="go with --nproc-per-node"):
        plan_run(tmp_path / "run", {"tiny_size": "test"}, [], Invocation(node_rank=1))
    assert not (tmp_path / "run").exists()
