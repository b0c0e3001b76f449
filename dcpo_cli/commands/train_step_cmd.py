"""`dcpo train-step`: one policy update from scored shards."""

from pathlib import Path

import typer

from dcpo_cli.commands import engine_flags
from dcpo_cli.commands.help_format import group
from dcpo_cli.core.presets import ADVANTAGES, CLIP_MODES, KL_TYPES, LOSS_AGGS, PRESETS
from dcpo_cli.options import ROLLOUT_CORRECTIONS, TRACKERS, TrainOptions, choices

D = TrainOptions()  # the defaults


def train_step(
    *,  # keyword-only: typer passes every option by name
    model: str = typer.Option(..., help="Policy: a model directory, a Hugging Face Hub id "
                              "(org/name[@revision]) or a train-step checkpoint (then optimizer, "
                              "lr schedule, RNG and global step continue)."),
    scored: list[Path] = typer.Option(..., help="Scored Parquet shard(s) of one rollout step, "
                                      "of one or several rollout rounds (`dcpo rollout "
                                      "--round`). Repeatable."),
    state: Path = typer.Option(..., help="SAS state file (created if absent; updated after the "
                               "checkpoint is written)."),
    out: Path = typer.Option(..., help="Checkpoint directory to write (atomically)."),
    algo: str = typer.Option(D.algo, help=f"Preset: {choices(PRESETS)}."),
    clip: str | None = typer.Option(None, help="Override the clipping: "
                                    f"{choices(CLIP_MODES)} (dac: per-token bounds; fixed: "
                                    "[1-eps_low, 1+eps_high]; sequence: GSPO)."),
    advantage: str | None = typer.Option(None, help="Override the advantage estimator: "
                                         f"{choices(ADVANTAGES)} (sas: smoothed; grpo: group "
                                         "mean/std)."),
    loss_agg: str | None = typer.Option(None, help="Override the loss aggregation: "
                                        f"{choices(LOSS_AGGS)}."),
    eps_low: float | None = typer.Option(None, help="Override the lower clip epsilon."),
    eps_high: float | None = typer.Option(None, help="Override the upper clip epsilon."),
    ratio_max: float | None = typer.Option(None, help="Override the DAC ratio cap."),
    dual_clip: float | None = typer.Option(None, help="Override the dual-clip constant c "
                                           "for negative advantages (0 turns it off)."),
    drop_uniform_groups: bool | None = typer.Option(
        None, "--drop-uniform-groups/--keep-uniform-groups",
        help="Drop groups whose responses are all correct or all wrong (DAPO's filter, on the "
        "scored `correct` column); default per preset."),
    kl_coef: float | None = typer.Option(None, help="Override the coefficient of the KL "
                                         "loss to the reference policy (grpo, gspo: 0.001; "
                                         "dcpo, dapo: 0 = off)."),
    kl_type: str | None = typer.Option(None, help="Override the KL estimator: "
                                       f"{choices(KL_TYPES)} (k3 = low_var_kl)."),
    ref_model: str | None = typer.Option(D.ref_model, help="KL reference policy: a directory "
                                         "or Hub id[@revision] (default: the run's first "
                                         "model, as recorded in the checkpoint)."),
    rollout_correction: str = typer.Option(D.rollout_correction, help="Correct for the "
                                           "sampler-trainer mismatch with per-token loss "
                                           f"weights: {choices(ROLLOUT_CORRECTIONS)} (tis: "
                                           "min(pi_old/pi_sampler, cap); mask: drop tokens "
                                           "beyond the cap). Needs response_logprobs."),
    rollout_correction_cap: float = typer.Option(D.rollout_correction_cap, help="The cap C "
                                                 "of --rollout-correction."),
    target_prompts: int | None = typer.Option(
        D.target_prompts,
        help="DAPO's refill: train on the first T kept groups, in rollout-round order "
        "then prompt order; later groups are neither trained nor absorbed into the state. "
        "Fewer kept groups: train on those."),
    lr: float = typer.Option(D.lr, help="Peak learning rate (AdamW)."),
    weight_decay: float = typer.Option(D.weight_decay, help="AdamW weight decay."),
    warmup_steps: int = typer.Option(D.warmup_steps, help="Linear lr warm-up, counted in "
                                      "train steps."),
    max_grad_norm: float = typer.Option(D.max_grad_norm, help="Gradient clipping norm."),
    mini_batch_size: int | None = typer.Option(None, help="Prompts per optimizer update "
                                               "(default: a quarter of the step's prompts, so "
                                               "4 updates per epoch)."),
    micro_batch_tokens: int = typer.Option(D.micro_batch_tokens, help="Token budget (padded) "
                                           "of one forward/backward micro-batch."),
    epochs: int = typer.Option(D.epochs, help="Passes over the step's responses."),
    seed: int = typer.Option(D.seed, help="Seed of the mini-batch shuffle (with the step, "
                              "epoch)."),
    gradient_checkpointing: bool = typer.Option(D.gradient_checkpointing,
                                                "--gradient-checkpointing/"
                                                "--no-gradient-checkpointing",
                                                help="Recompute activations in backward."),
    metrics_log: Path | None = typer.Option(None, help="Append the step's metrics to this "
                                            "JSONL file."),
    report_to: list[str] = typer.Option([], "--report-to", help="Also log the metrics to "
                                        f"{choices(TRACKERS)} (repeatable; each an extra: "
                                        "pip install 'dcpo-cli[wandb]'). One tracker run "
                                        "for the whole loop (README, Trackers)."),
    tracker_dir: Path | None = typer.Option(None, help="Where --report-to keeps its run ids "
                                            "(trackers.json) and tensorboard/, wandb/ "
                                            "(default: the folder of --state)."),
    nproc_per_node: int | None = typer.Option(None, help="Run on N processes of this node "
                                              "(FSDP2; re-launches itself through "
                                              "torch.distributed.run). Several nodes: run "
                                              "torchrun yourself (see README)."),
    cpu_offload: bool = typer.Option(D.cpu_offload, "--cpu-offload/--no-cpu-offload",
                                     help="FSDP2: keep parameters, gradients and optimizer "
                                     "state in CPU memory (under torchrun)."),
    keep_training_state: int = typer.Option(D.keep_training_state, help="Keep the training "
                                            "state (fp32 master weights, optimizer) of the "
                                            "newest K checkpoints of the run; older ones keep "
                                            "their weights, records and metrics."),
    lora_rank: int | None = typer.Option(D.lora_rank, help="Train a LoRA adapter of this "
                                         "rank (through peft) instead of every weight; the "
                                         "checkpoint is the adapter, naming its base model. "
                                         "A LoRA checkpoint as --model continues its adapter."),
    lora_alpha: float = typer.Option(D.lora_alpha, help="LoRA scaling alpha (the update is "
                                     "alpha / rank * B A; default TRL's)."),
    lora_dropout: float = typer.Option(D.lora_dropout, help="Dropout on the LoRA branch's "
                                       "input in the training forwards (default TRL's)."),
    lora_target_modules: str = typer.Option(D.lora_target_modules, help="Comma-separated "
                                            "module names to adapt (q_proj,v_proj), or "
                                            "all-linear: every linear layer but the lm-head "
                                            "(verl's default)."),
    reset_optimizer: bool = typer.Option(D.reset_optimizer, "--reset-optimizer",
                                         help="Continue a checkpoint with fresh optimizer "
                                         "moments (needed when its training state was "
                                         "deleted)."),
    no_verify: bool = engine_flags.NO_VERIFY,
) -> None:
    """Apply one DCPO (or GRPO/DAPO/GSPO) update and write a checkpoint."""
    engine_flags.apply_no_verify(no_verify)
    from dcpo_cli.console import err
    from dcpo_cli.console import out as console
    from dcpo_cli.options import from_values
    from dcpo_cli.options import report_to as tracker_names
    from dcpo_cli.train.step import metrics_table, run_train_step

    overrides = {key: value for key, value in (
        ("clip", clip), ("advantage", advantage), ("loss_agg", loss_agg), ("eps_low", eps_low),
        ("eps_high", eps_high), ("ratio_max", ratio_max), ("dual_clip", dual_clip),
        ("drop_uniform_groups", drop_uniform_groups), ("kl_coef", kl_coef),
        ("kl_type", kl_type)) if value is not None}
    options = from_values(TrainOptions, locals(), overrides=overrides)
    options.check()
    names = tracker_names(report_to)
    from dcpo_cli.files.locks import exclusive

    if nproc_per_node is not None:
        from dcpo_cli.parallel.launch import current_argv, relaunch, strip_option

        with exclusive(out, state):
            code = relaunch(strip_option(current_argv(), "--nproc-per-node"), nproc_per_node)
        raise typer.Exit(code)
    from dcpo_cli.trackers.session import Trackers

    home = tracker_dir or state.resolve().parent
    trackers = Trackers(names, home, home.name, {"train": options.record()})
    try:
        with exclusive(out, state):  # a second train-step on the same files is refused
            outcome = run_train_step(model, scored, state, out, options, trackers=trackers)
    finally:
        trackers.close()
    from dcpo_cli.parallel.distributed import world

    if not world().is_main:  # rank 0 prints the table
        return
    if outcome.status == "synced":
        err.print(f"{out}: already trained; state synced")
    elif outcome.status == "done":
        err.print(f"{out}: already done")
    console.print(metrics_table(outcome.metrics, f"train-step {outcome.metrics['step']} -> {out}"))


# The panels of the command's --help (commands/help_format.py).
group(train_step, {
    "Algorithm": ("algo", "clip", "advantage", "loss_agg", "eps_low", "eps_high", "ratio_max",
        "dual_clip", "drop_uniform_groups", "target_prompts"),
    "KL and sampler mismatch": ("kl_coef", "kl_type", "ref_model", "rollout_correction",
        "rollout_correction_cap"),
    "Optimization": ("lr", "weight_decay", "warmup_steps", "max_grad_norm", "mini_batch_size",
        "micro_batch_tokens", "epochs", "seed", "gradient_checkpointing"),
    "Checkpointing": ("keep_training_state", "reset_optimizer"),
    "Distributed": ("nproc_per_node", "cpu_offload"),
})
