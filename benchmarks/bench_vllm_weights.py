"""`dcpo run` with vLLM: new weights pushed into the running engine against a fresh engine
started from the checkpoint (what `dcpo run` did before, and what `dcpo rollout` does).

    .venv-vllm/bin/python benchmarks/bench_vllm_weights.py [--size test|default|wide]
                                                           [--repeats 3]

Needs vLLM (`make test-vllm` builds .venv-vllm with the CPU build). Both engines are the
CPU-friendly settings of tests/test_vllm_real.py (fp32, eager, a 64 MiB KV cache). The fresh
start is timed as `dcpo rollout` pays it: the engine's start in this process (vLLM's own
imports already done), from a checkpoint written by `save_pretrained`, up to the engine
being ready; the push includes the prefix-cache reset.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

SETTINGS = {"dtype": "float32", "enforce_eager": True,
            "engine_args": {"kv_cache_memory_bytes": 64 << 20}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="test", choices=["test", "default", "wide"],
                        help="the tiny model's size, or `wide`: a random-init Qwen2 of 9 layers "
                             "of width 512 (~110 MB, as benchmarks/bench_fingerprint.py)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch
    from rich.console import Console
    from rich.table import Table
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from dcpo_cli.engines import SamplingSettings, load_engine
    from dcpo_cli.tiny.build import init_tiny

    hf_logging.disable_progress_bar()
    directory = Path(tempfile.mkdtemp(prefix="bench-vllm-weights-"))
    model_dir = directory / "tiny" / "model"
    if args.size == "wide":
        from dcpo_cli.tiny.model import TinySize, build_model, build_tokenizer

        tokenizer = build_tokenizer()
        size = TinySize(hidden_size=512, num_layers=9, num_heads=8, num_kv_heads=2,
                        intermediate_size=1536, max_positions=512)
        build_model(tokenizer, size).save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
    else:
        init_tiny(directory / "tiny", seed=0, size=args.size)
    trainer = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    checkpoint = directory / "checkpoint"
    trainer.save_pretrained(checkpoint)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (model_dir / name).is_file():
            (checkpoint / name).write_bytes((model_dir / name).read_bytes())
    parameters = sum(p.numel() for p in trainer.parameters())
    sampling = SamplingSettings(n=1, temperature=1.0, max_new_tokens=4, seed=0)
    resident = load_engine("vllm", model_dir, resident=True, **SETTINGS)
    resident.generate([[1, 2, 3]], sampling)  # warm
    pushes = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        resident.load_weights(trainer.state_dict().items())
        pushes.append(time.perf_counter() - started)

    starts = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        fresh = load_engine("vllm", checkpoint, **SETTINGS)
        starts.append(time.perf_counter() - started)
        fresh.llm.llm_engine.engine_core.shutdown()
        del fresh

    result = Table(title=f"vLLM {args.size} model ({parameters / 1e6:.2f} M parameters), "
                        f"median of {args.repeats}", title_justify="left")
    result.add_column("new weights into the engine")
    result.add_column("seconds", justify="right")
    result.add_column("vs in memory", justify="right")
    push, start = statistics.median(pushes), statistics.median(starts)
    result.add_row("load_weights (in memory)", f"{push:.3f}", "1x")
    result.add_row("fresh engine from the checkpoint", f"{start:.2f}", f"{start / push:.0f}x")
    Console().print(result)


if __name__ == "__main__":
    main()
