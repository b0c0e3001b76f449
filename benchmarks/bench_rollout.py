"""Rollout throughput: our hf engine (and the whole `dcpo rollout` stage) against a bare
`model.generate` loop over the same prompts, batches and sampling settings.

    .venv/bin/python benchmarks/bench_rollout.py [--prompts 16] [--n 4] [--max-new-tokens 128]

Target: our overhead under 10%. The model is tiny.model.build_model(DEFAULT_SIZE), untrained;
the bare loop does the same work minus log-prob recording, eos cutting and decoding.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def bare_generate(engine, prompts, settings):
    """The baseline: left-padded `model.generate` over the engine's own batches."""
    import torch

    from dcpo_cli.engines.hf import token_budget_batches

    rows = [p for p in prompts for _ in range(settings.n)]
    tokens = 0
    for batch in token_budget_batches([len(r) for r in rows], settings.max_new_tokens,
                                      engine.token_budget):
        batch_rows = [rows[i] for i in batch]
        width = max(map(len, batch_rows))
        ids = torch.tensor([[engine.pad_id] * (width - len(r)) + r for r in batch_rows])
        mask = (torch.arange(width)[None, :] >= torch.tensor(
            [width - len(r) for r in batch_rows])[:, None]).long()
        with torch.inference_mode():
            out = engine.model.generate(input_ids=ids, attention_mask=mask, do_sample=True,
                                        max_new_tokens=settings.max_new_tokens, top_k=None,
                                        top_p=None, temperature=None,
                                        eos_token_id=sorted(engine.eos_ids),
                                        pad_token_id=engine.pad_id)
        tokens += int((out[:, width:] != engine.pad_id).sum())
    return tokens


def best_of(repeats, function):
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - started)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from dcpo_cli.engines import SamplingSettings, load_engine
    from dcpo_cli.engines.prompting import encode_prompts
    from dcpo_cli.files import contracts
    from dcpo_cli.stages.prepare import prompts_table
    from dcpo_cli.stages.rollout import RolloutOptions, run_rollout
    from dcpo_cli.tiny.model import DEFAULT_SIZE, build_model, build_tokenizer, save_model_dir

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokenizer = build_tokenizer()
        save_model_dir(build_model(tokenizer, DEFAULT_SIZE), tokenizer, tmp / "model")
        rows = [{"prompt_id": f"p{i}", "answer": str(i), "problem": "", "source": "bench",
                 "prompt": [{"role": "user", "content": f"Compute {i} * {i + 7} + {3 * i}."}]}
                for i in range(args.prompts)]
        contracts.write_table(prompts_table(rows), tmp / "prompts.parquet",
                          contracts.make_metadata("prompts", "bench"))
        engine = load_engine("hf", tmp / "model")
        prompts = [ids for _, ids in encode_prompts(engine.tokenizer,
                                                    [r["prompt"] for r in rows])]
        settings = SamplingSettings(n=args.n, max_new_tokens=args.max_new_tokens, seed=1)
        options = RolloutOptions(batch_size=args.prompts, n=args.n,
                                 max_new_tokens=args.max_new_tokens, engine="hf")

        bare_generate(engine, prompts[:2], settings)  # warm-up
        bare_s, bare_tokens = best_of(args.repeats, lambda: bare_generate(engine, prompts,
                                                                          settings))
        ours_s, groups = best_of(args.repeats, lambda: engine.generate(prompts, settings))
        ours_tokens = sum(len(c.token_ids) for g in groups for c in g)
        stage_s, summary = best_of(args.repeats, lambda: run_rollout(
            tmp / "model", tmp / "prompts.parquet", 0, tmp / "r.parquet", options, engine=engine))

    responses = args.prompts * args.n
    print(f"{responses} responses x up to {args.max_new_tokens} new tokens, DEFAULT_SIZE model, "
          f"torch threads {__import__('torch').get_num_threads()}, best of {args.repeats}")
    print(f"{'':28}{'seconds':>9}{'tokens':>9}{'tok/s':>9}{'overhead':>10}")
    for name, seconds, tokens in (("bare model.generate", bare_s, bare_tokens),
                                  ("hf engine.generate", ours_s, ours_tokens),
                                  ("dcpo rollout stage", stage_s, summary.tokens)):
        overhead = f"{seconds / bare_s - 1:+.1%}" if name != "bare model.generate" else ""
        print(f"{name:28}{seconds:9.2f}{tokens:9d}{tokens / seconds:9.0f}{overhead:>10}")


if __name__ == "__main__":
    main()
