"""`dcpo rollout`: sample responses for one step's prompts."""

from pathlib import Path

import typer

from dcpo_cli.commands.declared import command, panels
from dcpo_cli.engines.settings import EngineSettings, ServerAddress
from dcpo_cli.options import LoadOptions, RolloutOptions


def _rollout(
    *,
    model: str = typer.Option(..., help="Model directory, checkpoint, or Hugging Face Hub id "
                              "(org/name[@revision], fetched into the Hugging Face cache)."),
    prompts: Path = typer.Option(..., help="Prompts Parquet file (from `dcpo prepare`)."),
    step: int = typer.Option(..., help="Training step; step N takes the N-th slice of "
                             "--batch-size prompts of the per-epoch shuffles (0 is the first)."),
    out: Path = typer.Option(..., help="Rollouts Parquet file to write."),
    options: RolloutOptions, engine: EngineSettings, server: ServerAddress, load: LoadOptions,
) -> None:
    """Generate --n responses for each prompt of step N's batch."""
    from dcpo_cli.commands.shared import apply_load_options, server_address
    from dcpo_cli.console import out as console
    from dcpo_cli.stages.rollout import run_rollout

    apply_load_options(load)
    engine.check()
    s = run_rollout(model, prompts, step, out, options, engine_settings=engine,
                    server=server_address(server))
    skipped = f", {s.skipped} skipped as too long" if s.skipped else ""
    start = f"engine start {s.load_seconds:.1f} s, " if s.load_seconds is not None else ""
    console.print(
        f"wrote {s.out}: {s.responses} responses to {s.prompts} prompts{skipped}; "
        f"{start}{s.tokens} tokens in {s.seconds:.1f} s ({s.tokens_per_second:,.0f} tok/s), "
        f"{s.truncated / s.responses:.0%} hit --max-new-tokens", highlight=False)


rollout = panels(command(_rollout, options=RolloutOptions, engine=EngineSettings,
                         server=ServerAddress, load=LoadOptions),
                 ("Sampling", "Engine", "Checkpointing"))
