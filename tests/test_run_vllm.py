"""`dcpo run --engine vllm` with the real (CPU) vLLM engine, in one process and colocated
(`--nproc-per-node 2`: every rank trains its FSDP2 shard and generates with its own
in-process engine, vLLM's external launcher), full fine-tuning and LoRA.

After every train-step the new weights go into the engines in memory (full fine-tuning:
gathered from the shards one tensor at a time into vLLM's in-place reload; LoRA: the new
adapter), so the sampler's log-probs must stay the trainer's at every step (the mismatch
metrics as small as at step 0), and the colocated run must give the one-process run's
tokens, rewards and SAS state (the engines' shares are contiguous prompts with one seed
each), weights and log-probs within float noise. Four runs in all, each shared by its
assertions; the colocated full fine-tuning run is SIGKILLed once on one rank and re-run.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from loop_runs import RUN_FLAGS, STEPS, dcpo_run, finish, rank_pids, run_files

pytestmark = pytest.mark.vllm

# float32 weights and no graph capture (the trainer's precision; the CPU build's bf16 would
# be the mismatch under test), a 64 MiB KV cache (fast to allocate)
VLLM_FLAGS = [*RUN_FLAGS, "--engine", "vllm", "--set", "engine.dtype=float32",
              "--set", "engine.enforce_eager=true",
              "--set", 'engine.engine_args={"kv_cache_memory_bytes": 67108864}']
# Without dropout the LoRA update does not depend on how the ranks draw their masks
LORA_FLAGS = [*VLLM_FLAGS, "--lora-rank", "4", "--lora-dropout", "0"]
COLOCATED = ["--nproc-per-node", "2"]
# The world size changes float sums over ranks (by design), nothing else
APPROX = 1e-5
# mean |log pi_trainer - log pi_sampler| per token: ~2e-7 at step 0 (fp32 on both sides); a
# stale or garbled engine is 1e-2 and more
LOGPROB_DIFF = 1e-6


def _run(run_dir: Path, flags: list[str], env: dict[str, str]) -> str:  # noqa: F811
    return finish(dcpo_run(run_dir, STEPS, flags), env)


@pytest.fixture(scope="module")
def full(tmp_path_factory, env):  # noqa: F811
    """Full fine-tuning: (one-process run dir, its stdout)."""
    run_dir = tmp_path_factory.mktemp("vllm-full") / "run"
    return run_dir, _run(run_dir, VLLM_FLAGS, env)


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory, env):  # noqa: F811
    """LoRA: the one-process run dir, the colocated one, the colocated run's stdout."""
    folder = tmp_path_factory.mktemp("vllm-lora")
    _run(folder / "one", LORA_FLAGS, env)
    return folder / "one", folder / "two", _run(folder / "two", LORA_FLAGS + COLOCATED, env)


def _mismatch_stays_small(run_dir: Path) -> None:
    import json

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == STEPS
    for record in records:  # step 0 from the base model, later ones after pushes
        assert record["mismatch_logprob_diff"] < LOGPROB_DIFF, record
        assert record["mismatch_kl"] < LOGPROB_DIFF ** 2, record


def _assert_same_run(ours: Path, theirs: Path) -> None:
    """The same tokens, rewards, SAS state and evaluations; floats within APPROX."""
    from safetensors.torch import load

    a, b = run_files(ours), run_files(theirs)
    assert a["state"] == b["state"]  # SAS state, byte for byte
    for key in a:
        if isinstance(a[key], dict) and "rows" in a[key]:  # rollouts, scored, eval samples
            for column, values in a[key]["rows"].items():
                _close(values, b[key]["rows"][column], (key, column))
        elif key.endswith("safetensors"):
            wa, wb = load(a[key]), load(b[key])
            assert wa.keys() == wb.keys()
            assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= APPROX, key


def _close(x, y, where) -> None:
    if isinstance(x, float) and isinstance(y, float):
        assert abs(x - y) <= APPROX, where
    elif isinstance(x, list) and isinstance(y, list):
        assert len(x) == len(y), where
        for u, v in zip(x, y, strict=True):
            _close(u, v, where)
    else:
        assert x == y, where


def test_one_process_engine_generates_with_the_updated_weights(full):
    """Step 1's rollouts come from the weights train-step 0 wrote (their sampler log-probs
    equal the checkpoint's teacher-forced ones), with one engine for the whole run: each
    train-step's weights went into it in memory, none was started again."""
    import pyarrow.parquet as pq
    from transformers import AutoModelForCausalLM

    run_dir, stdout = full
    assert f"vllm engine: 1 start(s), {STEPS} in-memory weight update(s)" in stdout
    table = pq.read_table(run_dir / "steps" / "000001" / "rollouts.parquet").to_pylist()
    model = AutoModelForCausalLM.from_pretrained(run_dir / "ckpt" / "step-000001",
                                                 dtype=torch.float32).eval()
    worst = 0.0
    for row in table[:8]:
        prompt, response = row["prompt_token_ids"], row["response_token_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + response])).logits[0].float()
        logp = torch.log_softmax(logits[len(prompt) - 1:-1], -1)
        teacher = logp.gather(1, torch.tensor(response)[:, None])[:, 0]
        worst = max(worst, float((teacher - torch.tensor(row["response_logprobs"])).abs().max()))
    assert worst < 1e-4  # tests/test_vllm_real.py's LOGPROB_TOLERANCE
    _mismatch_stays_small(run_dir)


def test_colocated_run_killed_on_one_rank_then_rerun_is_the_one_process_run(full, tmp_path,
                                                                            env):  # noqa: F811
    """SIGKILL of rank 1 once step 1's rollouts are written (after the first push), then
    the same command: the run ends as the one-process run does, and every step's rollouts
    (from pushed weights, or from an engine started on a checkpoint after the resume) have
    the trainer's log-probs."""
    run_dir = tmp_path / "run"
    command = dcpo_run(run_dir, STEPS, VLLM_FLAGS + COLOCATED)
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    trigger = run_dir / "steps" / "000001" / "rollouts.parquet"
    while process.poll() is None and not trigger.is_file():
        time.sleep(0.05)
    pids = rank_pids(process.pid, "1")
    assert process.poll() is None and pids, "the run ended before step 1's rollouts"
    import os

    os.kill(pids[0], signal.SIGKILL)
    _, stderr = process.communicate(timeout=900)
    assert process.returncode == 2 and "rank 1 died (killed by SIGKILL)" in stderr, stderr[-2000:]
    assert not (run_dir / "ckpt" / f"step-{STEPS:06d}").exists()
    stdout = finish(command, env)
    assert "in-memory weight update(s) on each of 2 ranks" in stdout
    _mismatch_stays_small(run_dir)
    _assert_same_run(run_dir, full[0])


def test_colocated_lora_run_is_the_one_process_run(lora_runs):
    one, two, stdout = lora_runs
    # one engine per rank, started with LoRA on; each step's adapter swapped in
    assert f"vllm engine: 1 start(s), {STEPS} in-memory weight update(s) on each of 2 ranks" \
        in stdout
    _mismatch_stays_small(two)
    _mismatch_stays_small(one)
    _assert_same_run(two, one)
