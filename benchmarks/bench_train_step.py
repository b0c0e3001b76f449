"""Benchmark `dcpo train-step` (a script, not a test).

Prints:
1. train-step tokens/s on a tiny Qwen2 policy and synthetic scored data;
2. the ratio of train-step time (model load excluded: old log-probs + updates, and also with
   reading inputs / advantages / saving) to a bare forward + backward + AdamW pass over the
   same micro-batches (HF logits -> log_softmax -> mean token loss), target <= 1.25;
3. peak memory of the chunked log-prob computation (forward + backward) against a naive
   full log-softmax, on a Qwen2 model with a 151,936-token vocabulary, target <= 0.5x.
   On CPU: peak RSS growth of a fresh subprocess per method; on GPU: max_memory_allocated.
4. `dcpo train-step` in 1 process vs `--nproc-per-node 2` (FSDP2; gloo on CPU, nccl on GPU)
   on the same step: tokens/s of each (old log-probs + updates, summed over ranks), their
   ratio, and the peak memory per rank the step reports (`--processes 1,2`; `--processes ""`
   skips it).

    python benchmarks/bench_train_step.py [--size default|test] [--prompts 16] [--n 8]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dcpo_cli import contracts  # noqa: E402
from dcpo_cli.tiny.model import DEFAULT_SIZE, TEST_SIZE, TinySize  # noqa: E402

QWEN_VOCAB = 151_936


def make_scored(path: Path, vocab: int, eos: int, prompts: int, n: int, min_len: int,
                max_len: int, seed: int = 0) -> Path:
    import pyarrow as pa

    gen = torch.Generator().manual_seed(seed)
    rows: dict[str, list] = {name: [] for name in contracts.SCORED_COLUMNS}
    for p in range(prompts):
        prompt = torch.randint(5, vocab, (int(torch.randint(20, 60, (1,), generator=gen)),),
                               generator=gen).tolist()
        for i in range(n):
            length = int(torch.randint(min_len, max_len, (1,), generator=gen))
            response = torch.randint(5, vocab, (length,), generator=gen).tolist() + [eos]
            reward = float(torch.rand((), generator=gen) < 0.5)
            values = dict(step=0, prompt_id=f"p{p}", sample_index=i, prompt_text="",
                          prompt_token_ids=prompt, response_text="", response_token_ids=response,
                          response_logprobs=[0.0] * len(response), finish_reason="stop",
                          answer="1", reward=reward, correct=reward > 0, extracted_answer="")
            for k, v in values.items():
                rows[k].append(v)
    schema = pa.schema(list(contracts.SCORED_COLUMNS.items()))
    contracts.write_table(pa.table(rows, schema=schema), path,
                      contracts.make_metadata("scored", "score", step=0))
    return path


def bare_pass(model_dir: Path, scored: Path, micro_tokens: int, mini_batch_size: int | None,
              seed: int) -> tuple[float, int]:
    """Forward + backward + AdamW over the same mini/micro-batches, nothing else."""
    from dcpo_cli.core.batching import (
        collate,
        default_mini_batch_size,
        group_rows,
        micro_batches,
        mini_batches,
    )
    from dcpo_cli.policy.build import build_policy, device_and_dtype
    from dcpo_cli.policy.optim import build_optimizer
    from dcpo_cli.train.step import load_scored

    device, dtype = device_and_dtype()
    model, _ = build_policy(model_dir, device)
    optimizer = build_optimizer(model, 1e-6, 0.1)
    data = load_scored([scored])
    groups = group_rows(data.prompt_ids)
    lengths = [len(p) + len(r) for p, r in zip(data.prompt_tokens, data.response_tokens,
                                               strict=True)]
    plan = mini_batches(groups, mini_batch_size or default_mini_batch_size(len(groups)), seed,
                        data.step, 0)
    batches = [[collate(part, data.prompt_tokens, data.response_tokens, 0).to(device)
                for part in micro_batches(rows, lengths, micro_tokens)] for rows in plan]
    model.train()
    _sync()
    start, tokens = time.perf_counter(), 0
    for micro in batches:
        for b in micro:
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
            logp = torch.log_softmax(logits.float()[:, :-1], -1).gather(
                -1, b.input_ids[:, 1:, None]).squeeze(-1)
            loss = -(logp * b.attention_mask[:, 1:]).sum() / b.attention_mask.sum()
            loss.backward()
            tokens += b.num_tokens
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    _sync()
    return time.perf_counter() - start, tokens


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def speed(size: TinySize, prompts: int, n: int, min_len: int, max_len: int,
          micro_tokens: int) -> dict:
    from dcpo_cli.tiny.model import build_model, build_tokenizer, save_model_dir
    from dcpo_cli.train.step import TrainOptions, run_train_step

    root = Path(tempfile.mkdtemp(prefix="bench-train-step-"))
    tokenizer = build_tokenizer()
    model_dir = save_model_dir(build_model(tokenizer, size), tokenizer, root / "model")
    scored = make_scored(root / "scored.parquet", len(tokenizer), tokenizer.eos_token_id,
                         prompts, n, min_len, max_len)
    bare_seconds, bare_tokens = bare_pass(model_dir, scored, micro_tokens, None, 0)
    started = time.perf_counter()
    outcome = run_train_step(model_dir, [scored], root / "state.json", root / "ckpt",
                             TrainOptions(micro_batch_tokens=micro_tokens), show_progress=False)
    total = time.perf_counter() - started
    m = outcome.metrics
    return {
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "model_hidden": size.hidden_size, "model_layers": size.num_layers,
        "responses": m["responses"], "updates": m["updates"],
        "train_step_tokens_per_second": m["tokens_per_second"],
        "train_step_compute_seconds": m["compute_seconds"],
        "train_step_seconds_excluding_load": total - m["load_seconds"],
        "bare_seconds": bare_seconds, "bare_tokens": bare_tokens,
        "ratio_compute_to_bare": m["compute_seconds"] / bare_seconds,
        "ratio_total_excluding_load_to_bare": (total - m["load_seconds"]) / bare_seconds,
    }


def memory_worker(method: str, tokens: int, hidden: int, layers: int) -> dict:
    """One method's peak memory above the baseline (run in a fresh process on CPU)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from dcpo_cli.core.batching import collate
    from dcpo_cli.train.step import forward_logprobs

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=QWEN_VOCAB, hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=2 * hidden, tie_word_embeddings=True,
                         max_position_embeddings=tokens + 8)
    model = Qwen2ForCausalLM(config).to(device)
    prompt = [list(range(10, 42))]
    response = [torch.randint(0, QWEN_VOCAB, (tokens - 32,)).tolist()]
    batch = collate([0], prompt, response, 0).to(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_now()
    start = time.perf_counter()
    if method == "chunked":
        logp, _ = forward_logprobs(model, batch, chunk_elements=1 << 24)
        loss = -logp[batch.response_mask].mean()
    else:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        logp = torch.log_softmax(logits.float(), -1)[:, :-1].gather(
            -1, batch.input_ids[:, 1:, None]).squeeze(-1)
        loss = -logp[batch.predict_mask[:, :-1]].mean()
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"method": method, "peak_bytes": peak, "seconds": time.perf_counter() - start,
            "loss": float(loss)}


def _rss_now() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def memory(tokens: int, hidden: int, layers: int) -> dict:
    results = {}
    for method in ("naive", "chunked"):
        proc = subprocess.run([sys.executable, __file__, "--memory-worker", method,
                               "--tokens", str(tokens), "--hidden", str(hidden),
                               "--layers", str(layers)], capture_output=True, text=True,
                              check=True)
        results[method] = json.loads(proc.stdout.strip().splitlines()[-1])
    naive, chunked = results["naive"], results["chunked"]
    assert abs(naive["loss"] - chunked["loss"]) < 1e-3 * max(1.0, abs(naive["loss"])), results
    return {"vocab": QWEN_VOCAB, "tokens": tokens, "hidden": hidden,
            "naive_peak_mib": naive["peak_bytes"] / 2**20,
            "chunked_peak_mib": chunked["peak_bytes"] / 2**20,
            "memory_ratio": chunked["peak_bytes"] / naive["peak_bytes"],
            "naive_seconds": naive["seconds"], "chunked_seconds": chunked["seconds"]}


def processes(size: TinySize, counts: list[int], prompts: int, n: int, min_len: int,
              max_len: int, micro_tokens: int) -> dict:
    """The same scored step through the CLI on each process count (a fresh output each)."""
    import os

    from dcpo_cli.tiny.model import build_model, build_tokenizer, save_model_dir

    root = Path(tempfile.mkdtemp(prefix="bench-train-step-procs-"))
    tokenizer = build_tokenizer()
    model_dir = save_model_dir(build_model(tokenizer, size), tokenizer, root / "model")
    scored = make_scored(root / "scored.parquet", len(tokenizer), tokenizer.eos_token_id,
                         prompts, n, min_len, max_len)
    results: dict = {}
    for count in counts:
        out = root / f"ckpt-{count}"
        command = [sys.executable, "-m", "dcpo_cli", "train-step", "--model", str(model_dir),
                   "--scored", str(scored), "--state", str(root / f"state-{count}.json"),
                   "--out", str(out), "--micro-batch-tokens", str(micro_tokens)]
        if count > 1:
            command += ["--nproc-per-node", str(count)]
        # the node's cores shared out (torchrun's own default is 1 thread per process);
        # BENCH_THREADS_PER_PROCESS fixes it instead
        threads = os.environ.get("BENCH_THREADS_PER_PROCESS") or \
            str(max(1, (os.cpu_count() or 1) // count))
        env = {**os.environ, "OMP_NUM_THREADS": threads}
        subprocess.run(command, check=True, capture_output=True, text=True, env=env)
        metrics = json.loads((out / "metrics.json").read_text())
        results[f"tokens_per_second_{count}p"] = metrics["tokens_per_second"]
        for key in ("peak_gpu_memory_gib", "peak_cpu_rss_gib"):
            if key in metrics:
                results[f"{key}_{count}p"] = metrics[key]
    if len(counts) > 1:
        first, last = counts[0], counts[-1]
        results[f"ratio_{last}p_to_{first}p"] = (results[f"tokens_per_second_{last}p"]
                                                  / results[f"tokens_per_second_{first}p"])
    results["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() \
        else f"cpu ({os.cpu_count()} cores)"
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["default", "test"], default="default")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--min-len", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=160)
    parser.add_argument("--micro-batch-tokens", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=2048, help="memory test sequence length")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--memory-worker")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--processes", default="1,2",
                        help="process counts to compare (comma-separated; empty: skip)")
    args = parser.parse_args()
    if args.memory_worker:
        print(json.dumps(memory_worker(args.memory_worker, args.tokens, args.hidden,
                                       args.layers)))
        return
    report = {}
    if not args.skip_speed:
        size = DEFAULT_SIZE if args.size == "default" else TEST_SIZE
        report["speed"] = speed(size, args.prompts, args.n, args.min_len, args.max_len,
                                args.micro_batch_tokens)
    if not args.skip_memory:
        report["memory"] = memory(args.tokens, args.hidden, args.layers)
    counts = [int(c) for c in args.processes.split(",") if c.strip()]
    if counts:
        size = DEFAULT_SIZE if args.size == "default" else TEST_SIZE
        report["processes"] = processes(size, counts, args.prompts, args.n, args.min_len,
                                        args.max_len, args.micro_batch_tokens)
    from rich.console import Console
    from rich.table import Table

    table = Table(title="train-step benchmark")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for section, values in report.items():
        for key, value in values.items():
            table.add_row(f"{section}.{key}", f"{value:.4g}" if isinstance(value, float)
                          else str(value))
    Console().print(table)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
