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

# Under `make test` (pytest-xdist) the workers share the cores: every process they start
# (and the workers' own torch) gets one torch thread, or their thread teams wait on each
# other's descheduled threads (a stage ran several times slower). Each comparison of two runs
# then runs both at one thread, and float sums split over threads give the same bits
# (docs/scaling.md); a test that needs another count sets it. Before torch is imported.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "dcpo_cli" / "data" / "benchmarks"  # the package's own copies
TEST_DATA = REPO / "tests" / "data"  # verl/aime_2024.parquet: the official DCPO eval file


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str


def run_dcpo(*args: str, cwd: Path | None = None, timeout: float = 600,
             env: dict[str, str] | None = None) -> Result:
    """Run `dcpo ARGS` as a real process (exit codes, stderr and tracebacks as users see them),
    with `env` added to the environment."""
    env = {**os.environ, "COLUMNS": "200", **(env or {})}
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


def built_once(tmp_path_factory, name: str, build) -> Path:
    """`build(run_dir)` once per test run: under pytest-xdist (`make test`) the first worker
    to ask builds it, under a lock, in the temporary folder all workers share; the others
    wait for it and read it."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # pytest-N/, above each worker's popen-gwK/
    folder, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.is_file():
            shutil.rmtree(folder, ignore_errors=True)  # a worker that died half-way
            build(folder / "run")
            done.touch()
    return folder / "run"


@pytest.fixture(scope="session")
def shell_reference(tmp_path_factory, env) -> Path:
    """examples/tiny_loop.sh, loop_runs.STEPS steps, uninterrupted."""
    from loop_runs import STEPS, finish, shell_loop

    return built_once(tmp_path_factory, "shell-reference",
                      lambda run_dir: finish(shell_loop(run_dir, STEPS, env), env))


@pytest.fixture(scope="session")
def run_reference(tmp_path_factory, env) -> Path:
    """`dcpo run` with the shell loop's settings, loop_runs.STEPS steps, uninterrupted."""
    from loop_runs import STEPS, dcpo_run, finish

    return built_once(tmp_path_factory, "run-reference",
                      lambda run_dir: finish(dcpo_run(run_dir, STEPS), env))


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


# The modules that take minutes, longest first (`--durations` on 2 cores; a module of the
# two reference runs before one without, so that the other worker does not wait for them):
# started first under `make test` (pytest-xdist, one module per worker at a time), so that
# the run does not end waiting on one of them.
LONGEST_MODULES = ("tests/test_run.py", "tests/test_lag.py", "tests/test_tiny.py",
                   "tests/test_lora.py", "tests/test_loop.py", "tests/test_distributed.py",
                   "tests/test_run_parallel.py")


def pytest_collection_modifyitems(config, items):
    """LONGEST_MODULES first, each in its own order (`--dist loadfile --no-loadscope-reorder`
    sends whole modules to the workers in this order, and builds each module fixture once).

    The real-engine tests need vLLM, which only `.venv-vllm` has (`make test-vllm`):
    elsewhere a `-m` that selects them anyway (`pytest -m "not slow"`) skips them, saying why,
    instead of failing. `make test` deselects them, so CI skips none."""
    import importlib.util

    rank = {module: index for index, module in enumerate(LONGEST_MODULES)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable
    if importlib.util.find_spec("vllm") is not None:
        return
    skip = pytest.mark.skip(reason="needs vLLM: run `make test-vllm` (it builds .venv-vllm)")
    for item in items:
        # the marker, not the keywords: those hold the folder names too (a checkout in a
        # folder named vllm would skip every test)
        if item.get_closest_marker("vllm") is not None:
            item.add_marker(skip)
