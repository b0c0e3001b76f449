"""`dcpo train-step`: one policy update from scored shards."""

from pathlib import Path

import typer


def train_step(
    model: str = typer.Option(..., help="Policy: a model directory, a Hugging Face Hub id "
                              "(org/name[@revision]) or a train-step checkpoint (then optimizer, "
                              "lr schedule, RNG and global step continue)."),
    scored: list[Path] = typer.Option(..., help="Scored Parquet shard(s) of one rollout step. "
                                      "Repeatable."),
    state: Path = typer.Option(..., help="SAS state file (created if absent; updated after the "
                               "checkpoint is written)."),
    out: Path = typer.Option(..., help="Checkpoint directory to write (atomically)."),
    algo: str = typer.Option("dcpo", help="Preset: dcpo, grpo, dapo or gspo."),
    clip: str | None = typer.Option(None, help="Override the clipping: dac (per-token bounds), "
                                    "fixed [1-eps_low, 1+eps_high], or sequence (GSPO)."),
    advantage: str | None = typer.Option(None, help="Override the advantage estimator: sas "
                                         "(smoothed) or grpo (group mean/std)."),
    loss_agg: str | None = typer.Option(None, help="Override the loss aggregation: otm, "
                                        "token-mean, seq-mean-token-mean, seq-mean-token-sum, "
                                        "seq-mean-token-sum-norm."),
    eps_low: float | None = typer.Option(None, help="Override the lower clip epsilon."),
    eps_high: float | None = typer.Option(None, help="Override the upper clip epsilon."),
    ratio_max: float | None = typer.Option(None, help="Override the DAC ratio cap."),
    dual_clip: float | None = typer.Option(None, help="Override the dual-clip constant c "
                                           "for negative advantages (0 turns it off)."),
    drop_uniform_groups: bool | None = typer.Option(
        None, "--drop-uniform-groups/--keep-uniform-groups",
        help="Drop groups whose rewards are all equal (DAPO's filter); default per preset."),
    lr: float = typer.Option(1e-6, help="Peak learning rate (AdamW)."),
    weight_decay: float = typer.Option(0.1, help="AdamW weight decay."),
    warmup_steps: int = typer.Option(10, help="Linear lr warm-up, counted in train steps."),
    max_grad_norm: float = typer.Option(1.0, help="Gradient clipping norm."),
    mini_batch_size: int | None = typer.Option(None, help="Prompts per optimizer update "
                                               "(default: a quarter of the step's prompts, so "
                                               "4 updates per epoch)."),
    micro_batch_tokens: int = typer.Option(8192, help="Token budget (padded) of one forward/"
                                           "backward micro-batch."),
    epochs: int = typer.Option(1, help="Passes over the step's responses."),
    seed: int = typer.Option(0, help="Seed of the mini-batch shuffle (with the step, epoch)."),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing/"
                                                "--no-gradient-checkpointing",
                                                help="Recompute activations in backward."),
    metrics_log: Path | None = typer.Option(None, help="Append the step's metrics to this "
                                            "JSONL file."),
) -> None:
    """Apply one DCPO (or GRPO/DAPO/GSPO) update and write a checkpoint."""
    from dcpo_cli.console import err
    from dcpo_cli.console import out as console
    from dcpo_cli.errors import DcpoError
    from dcpo_cli.train_step import TrainOptions, metrics_table, run_train_step

    for name, value in (("--micro-batch-tokens", micro_batch_tokens), ("--epochs", epochs),
                        ("--mini-batch-size", 1 if mini_batch_size is None else mini_batch_size)):
        if value < 1:
            raise DcpoError(f"{name} must be at least 1")
    if lr < 0 or warmup_steps < 0 or max_grad_norm <= 0:
        raise DcpoError("--lr and --warmup-steps must be >= 0 and --max-grad-norm > 0")
    overrides = {key: value for key, value in (
        ("clip", clip), ("advantage", advantage), ("loss_agg", loss_agg), ("eps_low", eps_low),
        ("eps_high", eps_high), ("ratio_max", ratio_max), ("dual_clip", dual_clip),
        ("drop_uniform_groups", drop_uniform_groups)) if value is not None}
    options = TrainOptions(
        algo=algo, overrides=overrides, lr=lr, weight_decay=weight_decay,
        warmup_steps=warmup_steps, max_grad_norm=max_grad_norm, mini_batch_size=mini_batch_size,
        micro_batch_tokens=micro_batch_tokens, epochs=epochs, seed=seed,
        gradient_checkpointing=gradient_checkpointing, metrics_log=metrics_log)
    outcome = run_train_step(model, scored, state, out, options)
    if outcome.status == "synced":
        err.print(f"{out}: already trained; state synced")
    elif outcome.status == "done":
        err.print(f"{out}: already done")
    console.print(metrics_table(outcome.metrics, f"train-step {outcome.metrics['step']} -> {out}"))
