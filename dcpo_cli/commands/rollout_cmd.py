"""`dcpo rollout`: sample responses for one step's prompts."""

from pathlib import Path

import typer

from dcpo_cli.commands import engine_flags


def rollout(
    model: Path = typer.Option(..., help="Hugging Face model directory."),
    prompts: Path = typer.Option(..., help="Prompts Parquet file (from `dcpo prepare`)."),
    step: int = typer.Option(..., help="Training step; step N takes the N-th slice of "
                             "--batch-size prompts of the per-epoch shuffles (0 is the first)."),
    out: Path = typer.Option(..., help="Rollouts Parquet file to write."),
    batch_size: int = typer.Option(64, help="Prompts per step (before sharding)."),
    n: int = typer.Option(16, "--n", help="Responses per prompt (the group size G)."),
    temperature: float = typer.Option(1.0, help="Sampling temperature; 0 is greedy."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling threshold (1 turns it off)."),
    top_k: int = typer.Option(0, help="Keep only the k likeliest tokens (0 turns it off)."),
    max_new_tokens: int = typer.Option(1024, help="Longest response, in tokens."),
    max_prompt_tokens: int | None = typer.Option(
        None, help="Skip (and count) prompts longer than this, instead of truncating them."),
    seed: int = typer.Option(0, help="Seeds the prompt shuffle and the sampling."),
    shard: str = typer.Option("0/1", help="i/n: generate only part i of n of the step's "
                              "prompts (data-parallel rollout, one file per shard)."),
    engine: str = typer.Option("auto", help="hf, vllm, or auto (vllm when importable and a "
                               "GPU is present, else hf)."),
    chat_template: bool = typer.Option(True, "--chat-template/--no-chat-template",
                                       help="Apply the tokenizer's chat template."),
    tensor_parallel_size: int = engine_flags.TENSOR_PARALLEL_SIZE,
    gpu_memory_utilization: float | None = engine_flags.GPU_MEMORY_UTILIZATION,
    max_model_len: int | None = engine_flags.MAX_MODEL_LEN,
    dtype: str = engine_flags.DTYPE,
    enforce_eager: bool = engine_flags.ENFORCE_EAGER,
    engine_arg: list[str] = engine_flags.ENGINE_ARG,
    verbose: bool = engine_flags.VERBOSE,
) -> None:
    """Generate --n responses for each prompt of step N's batch."""
    from dcpo_cli.console import out as console
    from dcpo_cli.rollout import RolloutOptions, parse_shard, run_rollout

    options = RolloutOptions(
        batch_size=batch_size, n=n, temperature=temperature, top_p=top_p, top_k=top_k,
        max_new_tokens=max_new_tokens, max_prompt_tokens=max_prompt_tokens, seed=seed,
        shard=parse_shard(shard), engine=engine, chat_template=chat_template,
    )
    settings = engine_flags.engine_settings(tensor_parallel_size, gpu_memory_utilization,
                                            max_model_len, dtype, enforce_eager, engine_arg,
                                            verbose)
    s = run_rollout(model, prompts, step, out, options, engine_settings=settings)
    skipped = f", {s.skipped} skipped as too long" if s.skipped else ""
    start = f"engine start {s.load_seconds:.1f} s, " if s.load_seconds is not None else ""
    console.print(
        f"wrote {s.out}: {s.responses} responses to {s.prompts} prompts{skipped}; "
        f"{start}{s.tokens} tokens in {s.seconds:.1f} s ({s.tokens_per_second:,.0f} tok/s), "
        f"{s.truncated / s.responses:.0%} hit --max-new-tokens", highlight=False)
