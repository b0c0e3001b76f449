"""`dcpo export`: a plain model directory (a LoRA checkpoint merged into its base)."""

from pathlib import Path

import typer

from dcpo_cli.commands import engine_flags


def export(
    checkpoint: str = typer.Argument(..., help="A train-step checkpoint (LoRA or full), or "
                                     "any model directory or Hub id."),
    *,
    out: Path = typer.Option(..., help="New directory for the plain model (config, "
                             "safetensors in the base's dtype, tokenizer)."),
    no_verify: bool = engine_flags.NO_VERIFY,
) -> None:
    """Write a plain model that needs no peft: a LoRA adapter merged into its base model
    (a full checkpoint without its training state)."""
    from dcpo_cli.console import out as console
    from dcpo_cli.stages.export import run_export

    engine_flags.apply_no_verify(no_verify)
    done = run_export(checkpoint, out)
    what = f"LoRA adapter merged into {done.base}" if done.merged else "weights as trained"
    console.print(f"wrote {done.out}: {done.parameters:,} parameters ({what})", highlight=False)
