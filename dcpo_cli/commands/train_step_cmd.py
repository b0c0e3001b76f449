"""`dcpo train-step`: one policy update from scored shards."""

from pathlib import Path

import typer

from dcpo_cli.commands.declared import command, panels
from dcpo_cli.options import AlgoOverrides, LoadOptions, TrackerOptions, TrainOptions


def _train_step(
    *,
    model: str = typer.Option(..., help="Policy: a model directory, a Hugging Face Hub id "
                              "(org/name[@revision]) or a train-step checkpoint (then optimizer, "
                              "lr schedule, RNG and global step continue)."),
    scored: list[Path] = typer.Option(..., help="Scored Parquet shard(s) of one rollout step, "
                                      "of one or several rollout rounds (`dcpo rollout "
                                      "--round`). Repeatable."),
    state: Path = typer.Option(..., help="SAS state file (created if absent; updated after the "
                               "checkpoint is written)."),
    out: Path = typer.Option(..., help="Checkpoint directory to write (atomically)."),
    tracker_dir: Path | None = typer.Option(None, help="Where --report-to keeps its run ids "
                                            "(trackers.json) and tensorboard/, wandb/ "
                                            "(default: the folder of --state)."),
    nproc_per_node: int | None = typer.Option(None, help="Run on N processes of this node "
                                              "(FSDP2; re-launches itself through "
                                              "torch.distributed.run). Several nodes: run "
                                              "torchrun yourself (see docs/scaling.md).",
                                              rich_help_panel="Distributed"),
    options: TrainOptions, overrides: AlgoOverrides, trackers: TrackerOptions,
    load: LoadOptions,
) -> None:
    """Apply one DCPO (or GRPO/DAPO/GSPO) update and write a checkpoint."""
    import dataclasses

    from dcpo_cli.commands.shared import apply_load_options
    from dcpo_cli.console import err
    from dcpo_cli.console import out as console
    from dcpo_cli.train.step import metrics_table, run_train_step

    apply_load_options(load)
    options = dataclasses.replace(options, overrides=overrides.given())
    options.check()
    from dcpo_cli.files.locks import exclusive

    if nproc_per_node is not None:
        from dcpo_cli.parallel.launch import current_argv, relaunch, strip_option

        with exclusive(out, state):
            code = relaunch(strip_option(current_argv(), "--nproc-per-node"), nproc_per_node)
        raise typer.Exit(code)
    from dcpo_cli.trackers.session import Trackers

    home = tracker_dir or state.resolve().parent
    run_trackers = Trackers(list(trackers.report_to), home, home.name,
                            {"train": options.record()})
    try:
        with exclusive(out, state):  # a second train-step on the same files is refused
            outcome = run_train_step(model, scored, state, out, options, trackers=run_trackers)
    finally:
        run_trackers.close()
    from dcpo_cli.parallel.distributed import world

    if not world().is_main:  # rank 0 prints the table
        return
    if outcome.status == "synced":
        err.print(f"{out}: already trained; state synced")
    elif outcome.status == "done":
        err.print(f"{out}: already done")
    console.print(metrics_table(outcome.metrics, f"train-step {outcome.metrics['step']} -> {out}"))


train_step = panels(command(_train_step, options=TrainOptions, overrides=AlgoOverrides,
                            trackers=TrackerOptions, load=LoadOptions),
                    ("Algorithm", "KL and sampler mismatch", "Optimization", "LoRA",
                     "Checkpointing", "Distributed"))
