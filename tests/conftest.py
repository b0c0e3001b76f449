"""Shared fixtures: the CLI run in-process or as a real subprocess, and the benchmark data."""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import settings

# CI must not flake: the same examples on every run, and no per-example deadline (a busy
# machine stretches any example past hypothesis's default 200 ms). HYPOTHESIS_PROFILE=explore
# searches anew.
settings.register_profile("ci", derandomize=True, deadline=None)
settings.register_profile("explore", derandomize=False, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "dcpo_cli" / "data" / "benchmarks"  # the package's own copies
TEST_DATA = REPO / "tests" / "data"  # verl/aime_2024.parquet: the official DCPO eval file


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str


def run_dcpo(*args: str, cwd: Path | None = None, timeout: float = 600) -> Result:
    """Run `dcpo ARGS` as a real process (exit codes, stderr and tracebacks as users see them)."""
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-m", "dcpo_cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=env)
    return Result(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture
def dcpo():
    return run_dcpo


@pytest.fixture(scope="session")
def benchmarks(tmp_path_factory) -> Path:
    """A data directory as users keep one (`--data-dir`): the bundled benchmarks as plain
    JSONL (aime24.jsonl ...) and the verl-layout AIME 2024 file (verl/aime_2024.parquet)."""
    folder = tmp_path_factory.mktemp("benchmarks")
    for packed in sorted(BUNDLED.glob("*.jsonl.gz")):
        (folder / packed.name.removesuffix(".gz")).write_bytes(
            gzip.decompress(packed.read_bytes()))
    shutil.copytree(TEST_DATA / "verl", folder / "verl")
    return folder


def kill_at_random_progress(command: list[str], env: dict[str, str], run_dir: Path,
                            reference_dir: Path, seed: int = 1234, attempts: int = 4) -> int:
    """Start `command` `attempts` times, each SIGKILLed (with every process it started) after
    a random number of the reference run's files have appeared in `run_dir`, plus a random
    fraction of a second: points of its progress, not shares of a wall time, which a busy
    machine stretches. Returns how many runs were really killed (not already finished)."""
    import random
    import signal
    import time

    rng = random.Random(seed)
    total = sum(1 for _ in reference_dir.rglob("*"))
    kills = 0
    for threshold in sorted(rng.sample(range(1, total), attempts)):
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, start_new_session=True)
        while process.poll() is None and sum(1 for _ in run_dir.rglob("*")) < threshold:
            time.sleep(0.05)
        time.sleep(rng.uniform(0, 0.5))
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            kills += 1
        process.wait()
    return kills


def assert_one_line_error(result: Result, *fragments: str) -> None:
    """A bad input gives exit code 2 and exactly one line on stderr, with no traceback."""
    assert result.code == 2, (result.code, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture(scope="session")
def random_model_dir(tmp_path_factory) -> Path:
    """An untrained tiny Qwen2 model directory (test size): the fastest real model."""
    from dcpo_cli.tiny.model import build_random_model_dir

    return build_random_model_dir(tmp_path_factory.mktemp("random-model") / "model")


@pytest.fixture(scope="session")
def tokenizer(random_model_dir):
    """The tiny model's tokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(random_model_dir)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    """`dcpo tiny init --size test` (seed 0): model/, train.parquet, test.parquet, built once
    per session and shared, so no test may write into it (copy it first)."""
    from dcpo_cli.tiny.build import init_tiny

    folder = tmp_path_factory.mktemp("tiny") / "tiny"
    init_tiny(folder, seed=0, size="test")
    return folder


@pytest.fixture(scope="session")
def other_weights(tiny, tmp_path_factory) -> Path:
    """The tiny model with other weights (same vocabulary and config): a second checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("other") / "model"
    model = AutoModelForCausalLM.from_pretrained(tiny / "model")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                 "generation_config.json"):
        shutil.copy(tiny / "model" / name, folder / name)
    return folder


# ---------------------------------------------------------------- the reduced tiny loop
# (tests/loop_runs.py): its environment and the reference runs several test files compare
# with, each run once per session. Tests read them and never write into them.


@pytest.fixture(scope="session")
def in_process(tiny, tmp_path_factory):
    """In-process hf rollouts, made once per (model, shard) (test_serve*.py)."""
    from servers import rollout

    folder = tmp_path_factory.mktemp("in-process")
    made: dict[tuple[str, str], Path] = {}

    def get(model: Path, shard: str = "0/1") -> Path:
        key = (str(model), shard)
        if key not in made:
            out = folder / f"{len(made)}.parquet"
            result = rollout(model, tiny, out, "--engine", "hf", "--shard", shard)
            assert result.code == 0, result.stderr
            made[key] = out
        return made[key]

    return get



@pytest.fixture(scope="session")
def env(tmp_path_factory) -> dict[str, str]:
    """The shell loop's settings (loop_runs.LOOP_ENV) with the parity reward importable as
    loop_reward:parity, for examples/tiny_loop.sh and `dcpo run`/`dcpo study` alike."""
    from loop_runs import PARITY_REWARD, loop_env

    directory = tmp_path_factory.mktemp("reward")
    (directory / "loop_reward.py").write_text(PARITY_REWARD)
    return loop_env(directory)


@pytest.fixture(scope="session")
def shell_reference(tmp_path_factory, env) -> Path:
    """examples/tiny_loop.sh, loop_runs.STEPS steps, uninterrupted."""
    from loop_runs import STEPS, finish, shell_loop

    run_dir = tmp_path_factory.mktemp("shell") / "run"
    finish(shell_loop(run_dir, STEPS, env), env)
    return run_dir


@pytest.fixture(scope="session")
def run_reference(tmp_path_factory, env) -> Path:
    """`dcpo run` with the shell loop's settings, loop_runs.STEPS steps, uninterrupted."""
    from loop_runs import STEPS, dcpo_run, finish

    run_dir = tmp_path_factory.mktemp("dcpo-run") / "run"
    finish(dcpo_run(run_dir, STEPS), env)
    return run_dir


@pytest.fixture
def fake_vllm(monkeypatch):
    """A stand-in `vllm` module whose LLM is fakes.FakeLLM (the last one made: FakeLLM.last)."""
    import types

    from fakes import FakeLLM

    vllm = types.ModuleType("vllm")
    vllm.LLM = FakeLLM
    vllm.SamplingParams = lambda **kwargs: types.SimpleNamespace(**kwargs)
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = dict
    platforms = types.ModuleType("vllm.platforms")
    platforms.current_platform = types.SimpleNamespace(is_sleep_mode_available=lambda: True,
                                                       is_cpu=lambda: False)
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    monkeypatch.setitem(sys.modules, "vllm.platforms", platforms)
    lora_request = types.ModuleType("vllm.lora.request")
    lora_request.LoRARequest = lambda **kwargs: types.SimpleNamespace(**kwargs)
    monkeypatch.setitem(sys.modules, "vllm.lora", types.ModuleType("vllm.lora"))
    monkeypatch.setitem(sys.modules, "vllm.lora.request", lora_request)
    return vllm


# Session fixtures that take a minute or more to build: under `pytest -n` (pytest-xdist) the
# modules that read one run on the same worker, so each is built once per test run.
SHARED_RUNS = ("shell_reference", "run_reference")
# The groups that take minutes, longest first (`--durations` on 2 cores): started first, so
# that `-n 2` does not end waiting on one of them (`make test` keeps this order).
LONGEST_GROUPS = ("reference-runs", "tests/test_lag.py", "tests/test_tiny.py",
                  "tests/test_lora.py", "tests/test_distributed.py")


def pytest_collection_modifyitems(config, items):
    """Each test's xdist group (`--dist loadgroup`, `make test`): its module, so that module
    fixtures are built once, or "reference-runs" for every module with a test that reads
    SHARED_RUNS; the LONGEST_GROUPS first, each in its modules' order.

    The real-engine tests need vLLM, which only `.venv-vllm` has (`make test-vllm`):
    elsewhere a `-m` that selects them anyway (`pytest -m "not slow"`) skips them, saying why,
    instead of failing. `make test` deselects them, so CI skips none."""
    import importlib.util

    def module(item) -> str:
        return item.nodeid.split("::")[0]

    sharing = {module(item) for item in items
               if any(name in item.fixturenames for name in SHARED_RUNS)}
    groups = {item.nodeid: "reference-runs" if module(item) in sharing else module(item)
              for item in items}
    for item in items:
        item.add_marker(pytest.mark.xdist_group(groups[item.nodeid]))
    rank = {group: index for index, group in enumerate(LONGEST_GROUPS)}
    items.sort(key=lambda item: rank.get(groups[item.nodeid], len(rank)))  # stable
    if importlib.util.find_spec("vllm") is not None:
        return
    skip = pytest.mark.skip(reason="needs vLLM: run `make test-vllm` (it builds .venv-vllm)")
    for item in items:
        # the marker, not the keywords: those hold the folder names too (a checkout in a
        # folder named vllm would skip every test)
        if item.get_closest_marker("vllm") is not None:
            item.add_marker(skip)
