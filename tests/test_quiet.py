"""A normal run prints nothing from third-party libraries; DCPO_DEBUG=1 lets them speak."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from dcpo_cli.quiet import QUIET_ENV

THIRD_PARTY = re.compile(r"transformers|torch|datasets|vllm|warn|deprecat", re.IGNORECASE)


def run(args, debug: bool, cwd):
    env = {k: v for k, v in os.environ.items() if k not in QUIET_ENV and k != "DCPO_DEBUG"}
    env.update(COLUMNS="200", **({"DCPO_DEBUG": "1"} if debug else {}))
    proc = subprocess.run([sys.executable, "-m", "dcpo_cli", *map(str, args)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


@pytest.mark.slow
def test_rollout_and_eval_print_no_library_lines(random_model_dir, tmp_path):
    source = tmp_path / "p.jsonl"
    source.write_text('{"problem": "2+3?", "answer": "5"}\n{"problem": "4+4?", "answer": "8"}\n')
    prompts = tmp_path / "p.parquet"
    run(["prepare", source, "--out", prompts], False, tmp_path)
    rollout = ["rollout", "--model", random_model_dir, "--prompts", prompts, "--step", "0",
               "--batch-size", "2", "--n", "2", "--max-new-tokens", "4", "--engine", "hf"]
    # greedy decoding with --top-k set is what makes transformers complain about top_k
    evaluate = ["eval", "--model", random_model_dir, "--benchmark", "aime24", "--limit", "2",
                "--avg-at", "2", "--top-k", "5", "--max-new-tokens", "4", "--engine", "hf"]
    lines = []
    for debug in (False, True):
        lines.append(run([*rollout, "--out", tmp_path / f"r{debug}.parquet"], debug, tmp_path)
                     .splitlines())
        lines[-1] += run([*evaluate, "--out", tmp_path / f"E{debug}"], debug,
                         tmp_path).splitlines()
    quiet, loud = lines
    assert [line for line in quiet if THIRD_PARTY.search(line)] == []
    assert any("rollout step 0" in line for line in quiet)  # our own progress is still there
    # the same commands with DCPO_DEBUG=1 do show the library's lines this test looks for
    assert any("transformers" in line and "top_k" in line for line in loud), loud
