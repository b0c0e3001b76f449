"""`dcpo run`: the shell loop in one process, models kept loaded between stages."""

from pathlib import Path

import typer

from dcpo_cli.commands import engine_flags
from dcpo_cli.commands.help_format import group
from dcpo_cli.core.presets import PRESETS
from dcpo_cli.engines import SERVABLE
from dcpo_cli.options import DEFAULT_REWARD, TRACKERS, choices
from dcpo_cli.run.config import FLAGS, default_config
from dcpo_cli.tiny.build import CONFIGS

# Every flag defaults to None, meaning "not given": the first run takes the shell loop's
# default (shown in the help), a re-run the value in RUN_DIR/run.toml.
_DEFAULTS = default_config()


def default(flag: str) -> str:
    section, name = FLAGS[flag][0]
    return f"(default: {_DEFAULTS[section][name]})"



def run(
    run_dir: Path = typer.Argument(..., help="Run directory: steps/, ckpt/, eval/, state.json, "
                                   "metrics.jsonl and run.toml, as examples/tiny_loop.sh "
                                   "lays them out."),
    *,
    steps: int | None = typer.Option(None, help="Train steps in all (a re-run with more "
                                     f"continues the run) {default('steps')}."),
    model: str | None = typer.Option(None, help="Base model (directory or Hub id); default: "
                                     "the built-in tiny model, built into RUN_DIR/tiny."),
    prompts: Path | None = typer.Option(None, help="Training prompts (needed with --model)."),
    benchmark: list[str] | None = typer.Option(None, help="Evaluation set(s) for eval/ "
                                               "(default with the tiny model: its test set). "
                                               "Repeatable."),
    tiny_size: str | None = typer.Option(None, help=f"The tiny model's size: {choices(CONFIGS)} "
                                           f"{default('tiny_size')}."),
    algo: str | None = typer.Option(None, help=f"Preset: {choices(PRESETS)} "
                                    f"{default('algo')}."),
    batch_size: int | None = typer.Option(None, help=f"Prompts per step {default('batch_size')}."),
    n: int | None = typer.Option(None, "--n", help="Responses per prompt "
                                   f"{default('n')}."),
    max_new_tokens: int | None = typer.Option(None, help="Longest response, rollouts and "
                                              f"eval {default('max_new_tokens')}."),
    temperature: float | None = typer.Option(None, help="Rollout temperature "
                                             f"{default('temperature')}."),
    lr: float | None = typer.Option(None, help=f"Peak learning rate {default('lr')}."),
    warmup_steps: int | None = typer.Option(None, help="Linear lr warm-up in steps "
                                            f"{default('warmup_steps')}."),
    seed: int | None = typer.Option(None, help="Seed of the tiny model, prompt order, "
                                    f"sampling and mini-batches {default('seed')}."),
    eval_at: int | None = typer.Option(None, help="K samples per test problem, avg@K "
                                       f"{default('eval_at')}."),
    eval_every: int | None = typer.Option(None, help="Also evaluate every K steps (0: only "
                                          "before the first and after the last) "
                                          f"{default('eval_every')}."),
    engine: str | None = typer.Option(None, help=f"Generation engine: {choices(SERVABLE)} "
                                      f"{default('engine')}."),
    reward: str | None = typer.Option(None, help="Your own reward, package.module:function "
                                      f"(default {DEFAULT_REWARD}; with the dcpo preset it "
                                      "scores 1 / 0 / -1)."),
    lora_rank: int | None = typer.Option(None, help="Train a LoRA adapter of this rank "
                                         "instead of every weight (train-step --lora-rank; "
                                         "default: off)."),
    lora_alpha: float | None = typer.Option(None, help="LoRA scaling alpha "
                                            f"{default('lora_alpha')}."),
    lora_dropout: float | None = typer.Option(None, help="LoRA dropout "
                                              f"{default('lora_dropout')}."),
    lora_target_modules: str | None = typer.Option(None, help="Modules LoRA adapts, "
                                                   "comma-separated, or all-linear "
                                                   f"{default('lora_target_modules')}."),
    report_to: list[str] | None = typer.Option(None, "--report-to", help="Also log the "
                                               f"metrics and evaluations to {choices(TRACKERS)}"
                                               " (repeatable; a re-run may change it; "
                                               "default: none)."),
    set_: list[str] | None = typer.Option(None, "--set", metavar="SECTION.FIELD=VALUE",
                                          help="Any other setting of run.toml, e.g. "
                                          "train.weight_decay=0.0 or engine.enforce_eager="
                                          "true (VALUE read as JSON where it parses). "
                                          "Repeatable."),
    verbose: bool = engine_flags.VERBOSE,
    no_verify: bool = engine_flags.NO_VERIFY,
    nproc_per_node: int | None = typer.Option(None, help="Run on N processes of this node "
                                              "(torchrun): the policy sharded with FSDP2, "
                                              "each process generating its share with its "
                                              "own engine; the same files."),
    nnodes: int = typer.Option(1, help="With --nproc-per-node: nodes in all (run the same "
                               "command on each)."),
    node_rank: int = typer.Option(0, help="With --nnodes: this node's index, 0 .. nnodes-1."),
    master_addr: str | None = typer.Option(None, help="With --nnodes: address of the node "
                                           "with --node-rank 0."),
    master_port: int | None = typer.Option(None, help="With --nnodes: a free port there "
                                           "(default 29500)."),
) -> None:
    """Run rollout -> score -> train-step for each step (and eval) in one process, with the
    same files as examples/tiny_loop.sh; re-run the same command to resume."""
    import os

    from rich.table import Table

    from dcpo_cli.console import out
    from dcpo_cli.files import run_layout
    from dcpo_cli.run.config import resolve_values, write_config

    engine_flags.apply_no_verify(no_verify)
    config, rewrite = resolve_values(run_dir, locals())
    stored = run_layout.config_file(run_dir)
    source = stored if stored.is_file() else None
    from dcpo_cli.parallel.launch import Launch
    from dcpo_cli.run.colocated import check_world
    from dcpo_cli.run.loop import check_config, run_loop

    # everything checked before the first file is written
    options = check_config(run_dir, config, verbose, source)
    launch = None
    if nproc_per_node is not None:
        launch = Launch(nproc_per_node, nnodes, node_rank, master_addr, master_port)
        launch.check()
        launch.check_capacity()
    elif any(flag is not None for flag in (master_addr, master_port)) or nnodes != 1 \
            or node_rank != 0:
        from dcpo_cli.errors import DcpoError

        raise DcpoError("--nnodes, --node-rank, --master-addr and --master-port go with "
                        "--nproc-per-node")
    world_size = launch.world_size if launch else int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        check_world(world_size, options[4].tensor_parallel_size, options[0].batch_size,
                    options[0].n, options[2].mini_batch_size)
    first_rank = os.environ.get("RANK", "0") == "0" and (launch is None or node_rank == 0)
    from dcpo_cli.files.locks import exclusive

    # a second dcpo run on RUN_DIR is refused at once (rank 0, or the launcher, holds it)
    with exclusive(run_dir):
        if rewrite and first_rank:
            write_config(config, run_layout.config_file(run_dir))
        if launch is not None:
            from dcpo_cli.parallel.launch import current_argv, relaunch
            from dcpo_cli.run.loop import prepare_inputs

            if first_rank:
                prepare_inputs(run_dir, config["loop"], options[0].seed)
            raise typer.Exit(relaunch(current_argv(), launch))
        timings = run_loop(run_dir, config, verbose=verbose)
    if os.environ.get("RANK", "0") != "0":
        return
    table = Table(title=f"dcpo run {run_dir}", title_justify="left")
    for name in ("step", "wall s", "generate s", "score s", "update s", "wall / work"):
        table.add_column(name, justify="right")
    for t in timings:
        cells = [f"{x:.2f}" if x is not None else "skipped" for x in (t.generate, t.score,
                                                                     t.train)]
        ratio = f"{t.wall / t.work:.2f}" if t.work and None not in (t.generate, t.score,
                                                                   t.train) else ""
        table.add_row(str(t.step), f"{t.wall:.2f}", *cells, ratio)
    out.print(table)


# The panels of the command's --help (commands/help_format.py).
group(run, {
    "Sampling": ("batch_size", "n", "max_new_tokens", "temperature"),
    "Training": ("algo", "lr", "warmup_steps", "seed", "reward"),
    "Evaluation": ("benchmark", "eval_at", "eval_every"),
    "Engine": ("engine",),
})
