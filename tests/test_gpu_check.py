"""benchmarks/gpu_check.py: its FLOPs count against the models it describes, and the whole
check run on a CPU at the tiny size (`--size tiny`), so the GPU command cannot rot."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
from conftest import REPO


def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check",
                                                  REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_matmul_params_are_the_models_weight_matrices():
    """N of 6N: every 2-D weight of the model once (the tied head is the embedding), and
    Qwen2.5-1.5B's published counts (1.54 B in all, 1.31 B without the embedding)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    check = gpu_check()
    config = {**check.PLANS["tiny"].model, "vocab_size": 261}
    model = Qwen2ForCausalLM(Qwen2Config(**config))
    matrices = sum(p.numel() for p in model.parameters() if p.dim() == 2)
    assert check.matmul_params(config) == matrices
    qwen = check.QWEN25_15B
    with torch.device("meta"):
        big = Qwen2ForCausalLM(Qwen2Config(**qwen))
    assert check.matmul_params(qwen) == sum(p.numel() for p in big.parameters() if p.dim() == 2)
    embedding = qwen["hidden_size"] * qwen["vocab_size"]
    assert check.matmul_params(qwen) == pytest.approx(1.54e9, rel=0.01)
    assert check.matmul_params(qwen) - embedding == pytest.approx(1.31e9, rel=0.01)


def test_attention_flops_count_each_attended_position():
    check = gpu_check()
    config = {**check.PLANS["tiny"].model, "vocab_size": 261}
    n = check.matmul_params(config)
    # one token attends to itself; two tokens to 1 + 2 positions
    per_position = config["num_hidden_layers"] * 4 * config["hidden_size"]
    assert check.forward_flops(config, [1]) == 2 * n + per_position
    assert check.forward_flops(config, [2]) == 4 * n + 3 * per_position


@pytest.mark.slow
def test_the_check_runs_at_the_tiny_size_on_a_cpu(tmp_path):
    out = tmp_path / "check"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"),
                             "--size", "tiny", "--out", str(out), "--peak-tflops", "1"],
                            capture_output=True, text=True, timeout=1800,
                            env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = json.loads((out / "gpu_check.json").read_text())
    steps = figures["run"]["steps"]
    assert [s["step"] for s in steps] == [0, 1, 2]
    plan = figures["plan"]
    for step in steps:
        assert step["generated_tokens"] > 0 and step["generate_tokens_per_s"] > 0
        assert step["wall_s"] >= step["generate_s"] > 0  # parsed from dcpo run's step lines
        assert step["train_tokens_per_s"] > 0 and step["peak_memory_gib"] > 0
    alone = figures["train_step"]
    per_response, rest = divmod(alone["tokens"], plan["train_responses"])
    assert rest == 0 and per_response > plan["train_length"]  # a prompt, then the response
    for value in (alone["mfu"], figures["bare"]["mfu"]):
        assert value is not None and math.isfinite(value) and value > 0
    assert "train-step" in result.stdout and "MFU" in result.stdout
    # the work folder (model, checkpoints) is gone
    assert {p.name for p in out.iterdir()} == {"gpu_check.json", "run.log", "train_step.log"}
