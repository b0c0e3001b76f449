"""`dcpo prepare`: make a prompts file from a problem set."""

from pathlib import Path

import typer

from dcpo_cli.commands.help_format import group
from dcpo_cli.options import PAPER_INSTRUCTION


def prepare(
    *,  # keyword-only: typer passes every option by name
    src: str = typer.Argument(..., help="JSONL, JSON or Parquet file (verl layout too), "
                              "a Hub dataset name such as openai/gsm8k, or a folder "
                              "holding a downloaded Hub dataset."),
    out: Path = typer.Option(..., "--out", "-o", help="Prompts Parquet file to write."),
    problem_field: str | None = typer.Option(None, help="Field holding the problem text."),
    answer_field: str | None = typer.Option(None, help="Field holding the gold answer."),
    id_field: str | None = typer.Option(None, help="Field holding a unique id."),
    instruction: str = typer.Option(PAPER_INSTRUCTION, help="The instruction given with each "
                                    "problem ('' for none). Not applied to verl-layout chat "
                                    "prompts, which keep their own messages."),
    instruction_in: str = typer.Option("system", help="Where the instruction goes: system (the "
                                       "official layout: instruction as the system message, "
                                       "bare problem as the user message) or user (appended "
                                       "to the problem)."),
    system: str | None = typer.Option(None, help="System prompt to put before each problem "
                                      "(with --instruction-in user, or --instruction '')."),
    split: str | None = typer.Option(None, help="Hub datasets: split to load (default train)."),
    config: str | None = typer.Option(None, help="Hub datasets: configuration name."),
) -> None:
    """Turn a problem set into the prompts contract (prompt_id, prompt, answer)."""
    from dcpo_cli.console import out as console
    from dcpo_cli.files import contracts
    from dcpo_cli.stages.prepare import load_records, prepare_records, prompts_table

    records = load_records(src, split=split, config=config)
    name = Path(src).name
    prepared = prepare_records(records, name, problem_field=problem_field,
                               answer_field=answer_field, id_field=id_field,
                               instruction=instruction, system=system, source=name,
                               instruction_in=instruction_in)
    options = {"problem_field": problem_field, "answer_field": answer_field,
               "id_field": id_field, "instruction": instruction,
               "instruction_in": instruction_in, "system": system,
               "split": split, "config": config, "src": src}
    inputs = [src] if Path(src).is_file() else []
    metadata = contracts.make_metadata("prompts", "prepare", options=options, inputs=inputs)
    contracts.write_table(prompts_table(prepared.rows), out, metadata)
    console.print(f"wrote {out}: {len(prepared.rows)} prompts from {prepared.read} records "
                  f"({prepared.merged} repeated rows merged)", highlight=False)


# The panels of the command's --help (commands/help_format.py).
group(prepare, {
    "Fields": ("problem_field", "answer_field", "id_field"),
    "Prompts": ("instruction", "instruction_in", "system"),
    "Hub datasets": ("split", "config"),
})
