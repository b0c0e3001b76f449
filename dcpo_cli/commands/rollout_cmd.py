"""`dcpo rollout`: sample responses for one step's prompts."""

from pathlib import Path

import typer

from dcpo_cli.commands import engine_flags
from dcpo_cli.commands.help_format import group
from dcpo_cli.engines import ENGINES
from dcpo_cli.options import RolloutOptions, choices

D = RolloutOptions()  # the defaults


def rollout(
    *,  # keyword-only: typer passes every option by name
    model: str = typer.Option(..., help="Model directory, checkpoint, or Hugging Face Hub id "
                              "(org/name[@revision], fetched into the Hugging Face cache)."),
    prompts: Path = typer.Option(..., help="Prompts Parquet file (from `dcpo prepare`)."),
    step: int = typer.Option(..., help="Training step; step N takes the N-th slice of "
                             "--batch-size prompts of the per-epoch shuffles (0 is the first)."),
    out: Path = typer.Option(..., help="Rollouts Parquet file to write."),
    round: int = typer.Option(D.round, "--round", help="Refill round of the step (DAPO's "
                              "dynamic sampling): round k takes the next --batch-size prompts "
                              "after the step's slice and its earlier rounds, never one the "
                              "step already used. 0 is the step's own slice."),
    batch_size: int = typer.Option(D.batch_size, help="Prompts per step (before sharding)."),
    n: int = typer.Option(D.n, "--n", help="Responses per prompt (the group size G)."),
    temperature: float = typer.Option(D.temperature, help="Sampling temperature; 0 is greedy."),
    top_p: float = typer.Option(D.top_p, help="Nucleus sampling threshold (1 turns it off)."),
    top_k: int = typer.Option(D.top_k, help="Keep only the k likeliest tokens (0 turns it off)."),
    max_new_tokens: int = typer.Option(D.max_new_tokens, help="Longest response, in tokens."),
    max_prompt_tokens: int | None = typer.Option(
        None, help="Skip (and count) prompts longer than this, instead of truncating them."),
    seed: int = typer.Option(D.seed, help="Seeds the prompt shuffle and the sampling."),
    shard: str = typer.Option("0/1", help="i/n: generate only part i of n of the step's "
                              "prompts (data-parallel rollout, one file per shard)."),
    engine: str = typer.Option(D.engine, help=f"{choices(ENGINES)} (auto: vllm when "
                               "importable and a GPU is present, else hf; server: a running "
                               "`dcpo serve`, see --server-url)."),
    chat_template: bool = typer.Option(D.chat_template, "--chat-template/--no-chat-template",
                                       help="Apply the tokenizer's chat template."),
    tensor_parallel_size: int = engine_flags.TENSOR_PARALLEL_SIZE,
    gpu_memory_utilization: float | None = engine_flags.GPU_MEMORY_UTILIZATION,
    max_model_len: int | None = engine_flags.MAX_MODEL_LEN,
    dtype: str = engine_flags.DTYPE,
    enforce_eager: bool = engine_flags.ENFORCE_EAGER,
    engine_arg: list[str] = engine_flags.ENGINE_ARG,
    verbose: bool = engine_flags.VERBOSE,
    no_verify: bool = engine_flags.NO_VERIFY,
    server_url: str | None = engine_flags.SERVER_URL,
    server_token: str | None = engine_flags.SERVER_TOKEN,
) -> None:
    """Generate --n responses for each prompt of step N's batch."""
    engine_flags.apply_no_verify(no_verify)
    from dcpo_cli.console import out as console
    from dcpo_cli.options import from_values
    from dcpo_cli.stages.rollout import parse_shard, run_rollout

    options = from_values(RolloutOptions, locals(), shard=parse_shard(shard))
    settings = engine_flags.engine_settings(locals())
    server = engine_flags.server_address(locals())
    s = run_rollout(model, prompts, step, out, options, engine_settings=settings, server=server)
    skipped = f", {s.skipped} skipped as too long" if s.skipped else ""
    start = f"engine start {s.load_seconds:.1f} s, " if s.load_seconds is not None else ""
    console.print(
        f"wrote {s.out}: {s.responses} responses to {s.prompts} prompts{skipped}; "
        f"{start}{s.tokens} tokens in {s.seconds:.1f} s ({s.tokens_per_second:,.0f} tok/s), "
        f"{s.truncated / s.responses:.0%} hit --max-new-tokens", highlight=False)


# The panels of the command's --help (commands/help_format.py).
group(rollout, {
    "Sampling": ("n", "temperature", "top_p", "top_k", "max_new_tokens", "max_prompt_tokens",
        "chat_template"),
    "Engine": ("engine",),
})
