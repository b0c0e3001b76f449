"""The CLI surface: help lists every subcommand, --version, inspect."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO, assert_one_line_error

SUBCOMMANDS = ("prepare", "inspect", "tiny", "rollout", "score", "train-step", "eval", "report")


def test_help_lists_every_subcommand(dcpo):
    result = dcpo("--help")
    assert result.code == 0
    for name in SUBCOMMANDS:
        assert f" {name} " in result.stdout, name


def test_help_imports_no_heavy_library():
    code = ("import sys; from dcpo_cli.cli import run; run(['--help']);"
            "heavy = [m for m in ('torch', 'transformers', 'vllm', 'math_verify', 'datasets',"
            " 'matplotlib') if m in sys.modules]; print(heavy)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout + proc.stderr


def test_version(dcpo):
    from dcpo_cli import __version__

    result = dcpo("--version")
    assert result.code == 0 and result.stdout.strip() == f"dcpo {__version__}"


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
