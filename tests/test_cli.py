"""The CLI surface: help lists every subcommand, --version, inspect."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, assert_one_line_error

SUBCOMMANDS = ("prepare", "inspect", "tiny", "rollout", "score", "train-step", "eval", "report",
               "run")


def test_help_lists_every_subcommand(dcpo):
    result = dcpo("--help")
    assert result.code == 0
    for name in SUBCOMMANDS:
        assert f" {name} " in result.stdout, name


def test_help_imports_no_heavy_library():
    code = ("import sys; from dcpo_cli.cli import run; run(['--help']);"
            "heavy = [m for m in ('torch', 'transformers', 'vllm', 'math_verify', 'datasets',"
            " 'matplotlib', 'pyarrow') if m in sys.modules]; print(heavy)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout + proc.stderr


def test_version(dcpo):
    from dcpo_cli import __version__

    result = dcpo("--version")
    assert result.code == 0 and result.stdout.strip() == f"dcpo {__version__}"


@pytest.mark.slow
def test_inspect_prompts_json_and_table(dcpo, benchmarks, tmp_path):
    out = tmp_path / "a.parquet"
    assert dcpo("prepare", benchmarks / "aime24.jsonl", "--out", out).code == 0
    info = json.loads(dcpo("inspect", out, "--json", "--rows", "2").stdout)
    assert info["kind"] == "prompts" and info["rows"] == 30
    assert len(info["head"]) == 2 and info["metadata"]["stage"] == "prepare"
    assert set(info["schema"]) >= {"prompt_id", "prompt", "answer"}
    table = dcpo("inspect", out, "--columns", "prompt_id,answer")
    assert table.code == 0 and "first 5 rows" in table.stdout
    assert_one_line_error(dcpo("inspect", out, "--columns", "nope"), "column 'nope' is missing")
    assert_one_line_error(dcpo("inspect", tmp_path / "missing.parquet"), "no such file")
    # one metadata value, as JSON, for scripts (examples/tiny_loop.sh counts kept groups so)
    assert dcpo("inspect", out, "--metadata", "stage").stdout.strip() == '"prepare"'
    assert_one_line_error(dcpo("inspect", out, "--metadata", "nope"), "no metadata key 'nope'")


def test_a_bad_option_value_or_a_missing_option_is_one_line_exit_2(dcpo, tmp_path):
    """typer parses the values (it vendors its own click): still one line and exit 2."""
    out = tmp_path / "s.parquet"
    assert_one_line_error(dcpo("score", "r.parquet", "--out", out, "--wrong-reward", "x"),
                          "--wrong-reward")
    assert_one_line_error(dcpo("score", "r.parquet"), "--out")
    assert_one_line_error(dcpo("rollout", "--nope"), "--nope")
    assert not out.exists()


def _crashing_inspect(env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    """`dcpo inspect` whose reader hits a bug (a RuntimeError nobody foresaw)."""
    code = ("import sys, dcpo_cli.stages.inspect as i\n"
            "def boom(*a, **k): raise RuntimeError('a bug')\n"
            "i.describe = boom\n"
            "from dcpo_cli.cli import run\n"
            "sys.exit(run(['inspect', 'whatever.parquet']))\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, **env_extra})


def test_an_unforeseen_failure_is_one_line_and_exit_1_unless_debugging():
    proc = _crashing_inspect({"DCPO_DEBUG": ""})
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1, proc.stderr
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "RuntimeError: a bug" in lines[0] and "DCPO_DEBUG=1" in lines[0]
    debug = _crashing_inspect({"DCPO_DEBUG": "1"})
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_error_lines_show_brackets_literally(dcpo, tmp_path):
    folder = tmp_path / "[bold]runs[red]"
    folder.mkdir()
    result = dcpo("inspect", folder / "missing.parquet")
    assert_one_line_error(result, "[bold]runs[red]")


def test_an_output_path_that_is_a_directory_is_refused_before_any_work(dcpo, benchmarks,
                                                                        tmp_path):
    keep = tmp_path / "out" / "keep.txt"
    keep.parent.mkdir()
    keep.write_text("precious")
    result = dcpo("prepare", benchmarks / "aime24.jsonl", "--out", tmp_path / "out")
    assert_one_line_error(result, "out", "is an existing directory")
    assert keep.read_text() == "precious"


def test_the_exit_code_of_a_relaunch_is_the_commands(monkeypatch, tmp_path):
    """`train-step --nproc-per-node N` ends with typer.Exit(code of torchrun): a failed job
    must not exit 0 (click returns that code, not standalone, instead of raising)."""
    from dcpo_cli import cli
    from dcpo_cli.parallel import launch

    monkeypatch.setattr(launch, "relaunch", lambda argv, nproc: 7)
    code = cli.run(["train-step", "--model", "m", "--scored", str(tmp_path / "s.parquet"),
                    "--state", str(tmp_path / "s.json"), "--out", str(tmp_path / "c"),
                    "--nproc-per-node", "2"])
    assert code == 7


def test_help_does_not_import_click_beside_typers_own_copy():
    import importlib.util

    if importlib.util.find_spec("typer._click") is None:
        pytest.skip("this typer runs on click itself")
    code = ("import sys; from dcpo_cli.cli import run; run(['--help']);"
            "import typer._click; print('click' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.stdout.strip().splitlines()[-1] == "False", proc.stdout + proc.stderr
