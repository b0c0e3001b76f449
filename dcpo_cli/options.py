"""Every option of every stage, declared once: a dataclass field with its default, help,
panel and bounds (`fields.option`). The commands' signatures (commands/declared.py), run.toml
and `--set` (run/config.py) and `dcpo study` all follow from these declarations; the stages
take their option types from here. Nothing here imports torch or pyarrow, so `dcpo --help`
stays instant. A new option is one field here and its use in the stage (README, Extending).

The command line's vocabularies (algorithm, engine and tiny-model names) live here too, and
the registries that implement them (core/presets.py, engines/, tiny/build.py) check at
import that they name the same things.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dcpo_cli.errors import DcpoError
from dcpo_cli.extras import require
from dcpo_cli.fields import check_fields, choices, fail, new_default, option  # noqa: F401

# The paper's instruction. The official layout (its verl evaluation files) puts it in the
# system message and the bare problem in the user message; `--instruction-in user` appends
# it to the problem instead.
PAPER_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
INSTRUCTION_PLACES = ("system", "user")
# Logits computed at once in the chunked log-prob (elements of [positions, vocab]).
CHUNK_ELEMENTS = 1 << 24
# Sampler-trainer mismatch corrections of train-step (the math: dcpo_cli.core.mismatch).
ROLLOUT_CORRECTIONS = ("none", "tis", "mask")
# --rollout-correction's choices: "auto" is none on policy (staleness 0 or unknown) and tis
# on rollouts of an older policy (train-step --max-staleness; docs/design.md).
AUTO_CORRECTION = "auto"
ROLLOUT_CORRECTION_CHOICES = (AUTO_CORRECTION, *ROLLOUT_CORRECTIONS)
# The reward `dcpo score` uses without --reward (the interface: dcpo_cli.rewards), and the
# levels a reward function may return instead of a number (docs/design.md 1.4).
DEFAULT_REWARD = "dcpo_cli.rewards:math_verify"
REWARD_LEVELS = ("correct", "wrong", "no_answer")  # no_answer: no parseable \boxed{} answer
# LoRA defaults (train-step --lora-rank): TRL's ModelConfig lora_alpha and lora_dropout;
# verl's target_modules (all-linear: every linear layer but the output head).
LORA_ALPHA = 32.0
LORA_DROPOUT = 0.05
LORA_TARGET_MODULES = "all-linear"
# Experiment trackers of --report-to (dcpo_cli.trackers), each an optional extra.
TRACKERS = ("none", "tensorboard", "wandb", "trackio", "mlflow")
# The algorithm presets (core/presets.py) and the choices of their components.
ALGORITHMS = ("dcpo", "grpo", "dapo", "gspo")
CLIP_MODES = ("dac", "fixed", "sequence")
ADVANTAGES = ("sas", "grpo")
LOSS_AGGS = ("otm", "token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
             "seq-mean-token-sum-norm")
KL_TYPES = ("k1", "k2", "low_var_kl")
# Generation engines (engines/__init__.py REGISTRY, plus auto); dcpo serve holds all but server.
ENGINES = ("auto", "hf", "vllm", "server")
SERVABLE = ("auto", "hf", "vllm")
TINY_SIZES = ("default", "test")  # tiny/build.py CONFIGS




def report_to(values: list[str] | tuple[str, ...] | None) -> list[str]:
    """--report-to's trackers: repeatable or comma-separated, "none" for none, in order."""
    names = [n.strip() for value in values or [] for n in str(value).split(",") if n.strip()]
    for name in names:
        if name not in TRACKERS:
            raise DcpoError(f"--report-to {name!r}: expected {choices(TRACKERS)}")
    picked = [n for n in dict.fromkeys(names) if n != "none"]
    for name in picked:  # each tracker is the extra of its name
        require(name, f"--report-to {name}")
    return picked


def check_instruction_in(place: str) -> None:
    if place not in INSTRUCTION_PLACES:
        raise DcpoError(f"--instruction-in {place!r}: expected {choices(INSTRUCTION_PLACES)}")


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' -> (i, n), 0 <= i < n."""
    index, sep, count = str(text).partition("/")
    try:
        shard = (int(index), int(count))
    except ValueError:
        shard = None
    if not sep or shard is None or shard[1] < 1 or not 0 <= shard[0] < shard[1]:
        raise DcpoError(f"--shard {text!r}: expected i/n with 0 <= i < n, e.g. 0/4")
    return shard


SAMPLING, ENGINE = "Sampling", "Engine"


@dataclass(frozen=True)
class TrackerOptions:
    report_to: tuple[str, ...] = option(
        (), f"Also log the metrics and evaluation summaries to {choices(TRACKERS)} "
        "(repeatable or comma-separated; each an extra: pip install 'dcpo-cli[wandb]').",
        flags=("--report-to",), cli_type=list[str], cli_default=[],
        parse=lambda values: tuple(report_to(values)))


@dataclass(frozen=True)
class LoadOptions:
    no_verify: bool = option(False, "Load checkpoints without checking their weights against "
                             "the checksums recorded when they were written.",
                             panel="Checkpointing", flags=("--no-verify",))


@dataclass(frozen=True)
class SamplingOptions:
    """What rollout and eval sample with, declared once for both (each may change a default:
    `fields.new_default`)."""

    temperature: float = option(1.0, "Sampling temperature; 0 is greedy.", panel=SAMPLING,
                                at_least=0)
    top_p: float = option(1.0, "Nucleus sampling threshold (1 turns it off).", panel=SAMPLING,
                          above=0, at_most=1)
    top_k: int = option(0, "Keep only the k likeliest tokens (0 turns it off).",
                        panel=SAMPLING, at_least=0)
    max_new_tokens: int = option(1024, "Longest response, in tokens.", panel=SAMPLING,
                                 at_least=1)
    chat_template: bool = option(True, "Render prompts with the model's chat template.",
                                 panel=SAMPLING, flags=("--chat-template/--no-chat-template",))
    engine: str = option("auto", f"Generation engine: {choices(ENGINES)} (auto: vllm when "
                         "importable and a GPU is present, else hf; server: a running `dcpo "
                         "serve`, see --server-url).", panel=ENGINE, choices=ENGINES)


@dataclass(frozen=True)
class RolloutOptions(SamplingOptions):
    """Flat, like the command line and the `options` recorded in each rollouts file; the
    engine's `SamplingSettings` is built from them in `run_rollout` with the step's seed."""

    batch_size: int = option(64, "Prompts per step (before sharding).", at_least=1)
    n: int = option(16, "Responses per prompt (the group size G).", panel=SAMPLING,
                    flags=("--n",), at_least=1)
    max_prompt_tokens: int | None = option(None, "Skip (and count) prompts longer than this, "
                                           "instead of truncating them.", panel=SAMPLING,
                                           at_least=1)
    seed: int = option(0, "Seeds the prompt shuffle and the sampling.", at_least=0)
    shard: tuple[int, int] = option((0, 1), "i/n: generate only part i of n of the step's "
                                    "prompts (data-parallel rollout, one file per shard).",
                                    cli_type=str, cli_default="0/1", parse=parse_shard)
    round: int = option(0, "Refill round of the step (DAPO's dynamic sampling): round k takes "
                        "the next --batch-size prompts after the step's slice and its earlier "
                        "rounds, never one the step already used. 0 is the step's own slice.",
                        flags=("--round",), at_least=0)

    def check(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class ScoreOptions:
    workers: int | None = option(None, "Reward processes (default: all cores).", at_least=1)
    timeout: float = option(5.0, "Seconds allowed to score one response; slower ones count as "
                            "wrong and are flagged.", above=0)
    wrong_reward: float = option(0.0, "Reward of a boxed but wrong answer (right is 1.0).",
                                 panel="Rewards", finite=True)
    no_answer_reward: float | None = option(
        None, "Reward of a response with no parseable \\boxed{} answer (cut off ones "
        "included); default --wrong-reward. The official DCPO recipe: -1 (1 / 0 / -1). The "
        "scored file's reward_level column says which level each response got.",
        panel="Rewards", finite=True)
    overlong_buffer: int = option(0, "DAPO overlong shaping buffer in tokens (0: off); the max "
                                  "length comes from the rollouts.", panel="Rewards",
                                  at_least=0)
    max_length: int | None = option(None, "Max response length for overlong shaping, for files "
                                    "without rollout metadata.", panel="Rewards", at_least=1)
    reward: str | None = option(
        None, f"Your own reward, package.module:function (default: {DEFAULT_REWARD}), called "
        "as f(response_text, answer, row) in the worker pool. It returns the reward, or a "
        f"level ({', '.join(REWARD_LEVELS)}) that gets 1 / --wrong-reward / "
        "--no-answer-reward. A module in the current folder is found.", panel="Rewards")

    def check(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class EvalOptions(SamplingOptions):
    max_new_tokens: int = new_default(SamplingOptions, "max_new_tokens", 3072)
    avg_at: int = option(0, "K sampled responses per problem for avg@K, pass@K and maj@K; 0 = "
                         "greedy only.", panel="Metrics", flags=("--avg-at",), at_least=0)
    greedy: bool = option(True, "Also decode greedily (avg@1).", panel="Metrics",
                          flags=("--greedy/--no-greedy",))
    pass_at: tuple[int, ...] = option((), "Extra pass@k values to report (k <= K). "
                                      "Repeatable.", panel="Metrics", flags=("--pass-at",),
                                      cli_type=list[int], cli_default=[],
                                      parse=lambda ks: tuple(sorted(set(ks))))
    seed: int = option(0, "Sampling seed.", panel=SAMPLING, at_least=0)
    instruction: str = option(PAPER_INSTRUCTION, "The instruction given with each problem ('' "
                              "for none). verl-layout files keep their own messages.",
                              panel="Prompts")
    instruction_in: str = option("system", "Where the instruction goes: system (the official "
                                 "layout: instruction as the system message, bare problem as "
                                 "the user message) or user (appended to the problem).",
                                 panel="Prompts", choices=INSTRUCTION_PLACES)
    limit: int | None = option(None, "Only the first N problems of each benchmark.",
                               at_least=1)

    def check(self) -> None:  # the engine name: `engines.pick_engine`, first thing run_eval does
        check_fields(self)
        if self.avg_at == 0 and not self.greedy:
            raise DcpoError("nothing to evaluate: --no-greedy needs --avg-at K with K >= 1")
        if self.avg_at == 1 and self.greedy:
            raise DcpoError("--avg-at 1 would report a sampled avg@1 beside the greedy avg@1; "
                            "add --no-greedy for a sampled-only avg@1, or use --avg-at 2 or more")
        bad = [k for k in self.pass_at if not 1 <= k <= self.avg_at]
        if bad:
            raise fail(EvalOptions, "pass_at",
                       f"{bad[0]}: needs 1 <= k <= --avg-at ({self.avg_at})")


ALGORITHM = "Algorithm"


@dataclass(frozen=True)
class AlgoOverrides:
    """train-step's changes to its preset's objective (None: the preset's own); they travel
    as TrainOptions.overrides, a [train.overrides] table in run.toml."""

    clip: str | None = option(None, f"Override the clipping: {choices(CLIP_MODES)} (dac: "
                              "per-token bounds; fixed: [1-eps_low, 1+eps_high]; sequence: "
                              "GSPO).", panel=ALGORITHM, choices=CLIP_MODES)
    advantage: str | None = option(None, "Override the advantage estimator: "
                                   f"{choices(ADVANTAGES)} (sas: smoothed; grpo: group "
                                   "mean/std).", panel=ALGORITHM, choices=ADVANTAGES)
    loss_agg: str | None = option(None, f"Override the loss aggregation: {choices(LOSS_AGGS)}.",
                                  panel=ALGORITHM, choices=LOSS_AGGS)
    eps_low: float | None = option(None, "Override the lower clip epsilon.", panel=ALGORITHM)
    eps_high: float | None = option(None, "Override the upper clip epsilon.", panel=ALGORITHM)
    ratio_max: float | None = option(None, "Override the DAC ratio cap.", panel=ALGORITHM)
    dual_clip: float | None = option(None, "Override the dual-clip constant c for negative "
                                     "advantages (0 turns it off).", panel=ALGORITHM)
    drop_uniform_groups: bool | None = option(
        None, "Drop groups whose responses are all correct or all wrong (DAPO's filter, on the "
        "scored `correct` column); default per preset.", panel=ALGORITHM,
        flags=("--drop-uniform-groups/--keep-uniform-groups",))
    kl_coef: float | None = option(None, "Override the coefficient of the KL loss to the "
                                   "reference policy (grpo, gspo: 0.001; dcpo, dapo: 0 = off).",
                                   panel="KL and sampler mismatch")
    kl_type: str | None = option(None, f"Override the KL estimator: {choices(KL_TYPES)} (k3 = "
                                 "low_var_kl).", panel="KL and sampler mismatch",
                                 choices=(*KL_TYPES, "k3"))

    def given(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


OPTIMIZATION, LORA = "Optimization", "LoRA"


@dataclass
class TrainOptions:
    algo: str = option("dcpo", f"Preset: {choices(ALGORITHMS)}.", panel=ALGORITHM,
                       choices=ALGORITHMS)
    # AlgoConfig fields to change: on the command line AlgoOverrides' flags
    overrides: dict[str, Any] = option(help="Changes to the preset (AlgoOverrides).",
                                       factory=dict, cli=False)
    target_prompts: int | None = option(
        None, "DAPO's refill: train on the first T kept groups, in rollout-round order then "
        "prompt order; later groups are neither trained nor absorbed into the state. Fewer "
        "kept groups: train on those.", panel=ALGORITHM, at_least=1)
    # The KL loss's reference policy (used when kl_coef > 0); None: the run's first model.
    ref_model: str | None = option(None, "KL reference policy: a directory or Hub "
                                   "id[@revision] (default: the run's first model, as recorded "
                                   "in the checkpoint).", panel="KL and sampler mismatch")
    rollout_correction: str = option(
        AUTO_CORRECTION, "Correct for the sampler-trainer mismatch with per-token loss "
        f"weights: {choices(ROLLOUT_CORRECTION_CHOICES)} (tis: min(pi_old/pi_sampler, cap); "
        "mask: drop tokens beyond the cap; auto: none on policy, tis on stale rollouts). "
        "Needs response_logprobs.", panel="KL and sampler mismatch",
        choices=ROLLOUT_CORRECTION_CHOICES)
    rollout_correction_cap: float = option(2.0, "The cap C of --rollout-correction.",
                                           panel="KL and sampler mismatch", above=0)
    max_staleness: int = option(0, "Accept rollouts sampled by a policy up to K train steps "
                                "older than --model (a lagged loop: generation overlapped "
                                "with training); 0: only --model's own.",
                                panel="KL and sampler mismatch", at_least=0)
    lr: float = option(1e-6, "Peak learning rate (AdamW).", panel=OPTIMIZATION, at_least=0)
    weight_decay: float = option(0.1, "AdamW weight decay.", panel=OPTIMIZATION, at_least=0)
    warmup_steps: int = option(10, "Linear lr warm-up, counted in train steps.",
                               panel=OPTIMIZATION, at_least=0)
    max_grad_norm: float = option(1.0, "Gradient clipping norm.", panel=OPTIMIZATION, above=0)
    mini_batch_size: int | None = option(None, "Prompts per optimizer update (default: a "
                                         "quarter of the step's prompts, so 4 updates per "
                                         "epoch).", panel=OPTIMIZATION, at_least=1)
    micro_batch_tokens: int = option(8192, "Token budget (padded) of one forward/backward "
                                     "micro-batch.", panel=OPTIMIZATION, at_least=1)
    epochs: int = option(1, "Passes over the step's responses.", panel=OPTIMIZATION,
                         at_least=1)
    seed: int = option(0, "Seed of the mini-batch shuffle (with the step, epoch).",
                       panel=OPTIMIZATION, at_least=0)
    gradient_checkpointing: bool = option(False, "Recompute activations in backward.",
                                          panel=OPTIMIZATION,
                                          flags=("--gradient-checkpointing/"
                                                 "--no-gradient-checkpointing",))
    metrics_log: Path | None = option(None, "Append the step's metrics to this JSONL file.")
    chunk_elements: int = option(CHUNK_ELEMENTS, "Logits computed at once in the chunked "
                                 "log-prob ([positions x vocab] elements).", cli=False,
                                 at_least=1)
    cpu_offload: bool = option(False, "FSDP2: keep parameters, gradients and optimizer state "
                               "in CPU memory (under torchrun).", panel="Distributed",
                               flags=("--cpu-offload/--no-cpu-offload",))
    keep_training_state: int = option(1, "Keep the training state (fp32 master weights, "
                                      "optimizer) of the newest K checkpoints of the run; "
                                      "older ones keep their weights, records and metrics.",
                                      panel="Checkpointing", at_least=1)
    reset_optimizer: bool = option(False, "Continue a checkpoint with fresh optimizer moments "
                                   "(needed when its training state was deleted).",
                                   panel="Checkpointing", flags=("--reset-optimizer",))
    # LoRA (through peft): None trains every weight. Defaults: TRL's ModelConfig (alpha 32,
    # dropout 0.05) and verl's target modules (every linear layer but the lm-head).
    lora_rank: int | None = option(None, "Train a LoRA adapter of this rank (through peft) "
                                   "instead of every weight; the checkpoint is the adapter, "
                                   "naming its base model. A LoRA checkpoint as --model "
                                   "continues its adapter.", panel=LORA, at_least=1)
    lora_alpha: float = option(LORA_ALPHA, "LoRA scaling alpha (the update is alpha / rank * "
                               "B A; default TRL's).", panel=LORA, above=0)
    lora_dropout: float = option(LORA_DROPOUT, "Dropout on the LoRA branch's input in the "
                                 "training forwards (default TRL's).", panel=LORA, at_least=0)
    lora_target_modules: str = option(LORA_TARGET_MODULES, "Comma-separated module names to "
                                      "adapt (q_proj,v_proj), or all-linear: every linear "
                                      "layer but the lm-head (verl's default).", panel=LORA)

    # How the step runs and what is kept, not what it computes: not in the record.
    UNRECORDED = ("metrics_log", "cpu_offload", "keep_training_state", "max_staleness")

    def record(self) -> dict[str, Any]:
        """The options that determine the result (recorded in the checkpoint)."""
        return {k: v for k, v in self.__dict__.items() if k not in self.UNRECORDED}

    def check(self) -> None:
        check_fields(self)
        if self.lora_rank is not None:
            require("lora", "--lora-rank")
        if not self.lora_dropout < 1:
            raise fail(TrainOptions, "lora_dropout",
                       f"must be in [0, 1) (got {self.lora_dropout})")
        if not [t for t in str(self.lora_target_modules).split(",") if t.strip()]:
            raise fail(TrainOptions, "lora_target_modules",
                       "names no module (name at least one, or all-linear)")


EVALUATION, DISTRIBUTED = "Evaluation", "Distributed"


@dataclass(frozen=True)
class LoopOptions(TrackerOptions):
    """`dcpo run`'s own settings (run.toml's [loop]): what the shell loop takes as arguments
    and environment."""

    steps: int = option(20, "Train steps in all (a re-run with more continues the run).",
                        at_least=1)
    model: str | None = option(None, "Base model (directory or Hub id); default: the built-in "
                               "tiny model, built into RUN_DIR/tiny.")
    prompts: str | None = option(None, "Training prompts (needed with --model).",
                                 metavar="PATH")
    tiny_size: str = option("default", f"The tiny model's size: {choices(TINY_SIZES)}.",
                            choices=TINY_SIZES)
    benchmark: tuple[str, ...] = option((), "Evaluation set(s) for eval/ (default with the "
                                        "tiny model: its test set). Repeatable.",
                                        panel=EVALUATION, cli_type=list[str])
    eval_every: int = option(0, "Also evaluate every K steps (0: only before the first and "
                             "after the last).", panel=EVALUATION, at_least=0)
    max_rounds: int = option(4, "DAPO's refill: rollout rounds per step at most (the shell "
                             "loop's MAX_ROUNDS).", cli=False, at_least=1)

    def check(self) -> None:
        check_fields(self)
        report_to(self.report_to)
        if self.model is not None and self.prompts is None:
            raise fail(LoopOptions, "model", "needs --prompts (the training prompts file)")


@dataclass(frozen=True)
class LaunchOptions:
    """How many processes `dcpo run` trains on (run.toml's [launch]; a re-run's default)."""

    nproc_per_node: int | None = option(
        None, "Run on N processes of this node (torchrun): the policy sharded with FSDP2, "
        "each process generating its share with its own engine; the same files.",
        panel=DISTRIBUTED, at_least=1)
    nnodes: int = option(1, "With --nproc-per-node: nodes in all (run the same command on "
                         "each).", panel=DISTRIBUTED, at_least=1)

    def check(self) -> None:
        check_fields(self)
        if self.nnodes > 1 and self.nproc_per_node is None:
            raise fail(LaunchOptions, "nnodes", "goes with --nproc-per-node")
