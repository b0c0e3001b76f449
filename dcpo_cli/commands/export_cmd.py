"""`dcpo export`: a plain model directory (a LoRA checkpoint merged into its base)."""

from pathlib import Path

import typer

from dcpo_cli.commands.declared import command
from dcpo_cli.options import LoadOptions


def _export(
    checkpoint: str = typer.Argument(..., help="A train-step checkpoint (LoRA or full), or "
                                     "any model directory or Hub id."),
    *,
    out: Path = typer.Option(..., help="New directory for the plain model (config, "
                             "safetensors in the base's dtype, tokenizer)."),
    load: LoadOptions,
) -> None:
    """Write a plain model that needs no peft: a LoRA adapter merged into its base model
    (a full checkpoint without its training state)."""
    from dcpo_cli.commands.shared import apply_load_options
    from dcpo_cli.console import out as console
    from dcpo_cli.stages.export import run_export

    apply_load_options(load)
    done = run_export(checkpoint, out)
    what = f"LoRA adapter merged into {done.base}" if done.merged else "weights as trained"
    console.print(f"wrote {done.out}: {done.parameters:,} parameters ({what})", highlight=False)


export = command(_export, load=LoadOptions)
