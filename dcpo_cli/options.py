"""Every stage's options, defaults, choice lists and shared constants, defined once.

The typer commands take their defaults, choices and help from here, the stage modules take
their option types from here, and nothing here imports torch or pyarrow, so `dcpo --help`
stays instant. A new option is one field here, one typer parameter in its command (default
`<Options>.<field>`) and its use in the stage.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from dcpo_cli.errors import DcpoError
from dcpo_cli.extras import require

# The paper's instruction. The official layout (its verl evaluation files) puts it in the
# system message and the bare problem in the user message; `--instruction-in user` appends
# it to the problem instead.
PAPER_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
INSTRUCTION_PLACES = ("system", "user")
# Logits computed at once in the chunked log-prob (elements of [positions, vocab]).
CHUNK_ELEMENTS = 1 << 24
# Sampler-trainer mismatch corrections of train-step (the math: dcpo_cli.core.mismatch).
ROLLOUT_CORRECTIONS = ("none", "tis", "mask")
# The reward `dcpo score` uses without --reward (the interface: dcpo_cli.rewards), and the
# levels a reward function may return instead of a number (docs/design.md 1.4).
DEFAULT_REWARD = "dcpo_cli.rewards:math_verify"
REWARD_LEVELS = ("correct", "wrong", "no_answer")  # no_answer: no parseable \boxed{} answer
# LoRA defaults (train-step --lora-rank): TRL's ModelConfig lora_alpha and lora_dropout;
# verl's target_modules (all-linear: every linear layer but the output head).
LORA_ALPHA = 32.0
LORA_DROPOUT = 0.05
LORA_TARGET_MODULES = "all-linear"
# Experiment trackers of --report-to (dcpo_cli.files.trackers), each an optional extra.
TRACKERS = ("none", "tensorboard", "wandb", "trackio", "mlflow")


def choices(names) -> str:
    """A choice list for help texts and error messages: 'a, b or c'."""
    names = list(names)
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def check_sampling(temperature: float, top_p: float, top_k: int, max_new_tokens: int) -> None:
    """The sampling settings rollout and eval share, checked with the same messages."""
    problems = [
        (temperature < 0, "--temperature must be >= 0"),
        (not 0 < top_p <= 1, "--top-p must be in (0, 1]"),
        (top_k < 0, "--top-k must be >= 0 (0 turns it off)"),
        (max_new_tokens < 1, "--max-new-tokens must be at least 1"),
    ]
    for failed, message in problems:
        if failed:
            raise DcpoError(message)


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


T = TypeVar("T")


def from_values(cls: type[T], values: dict[str, Any], **changes: Any) -> T:
    """An options object from a command's keyword values (its `locals()`): the parameters
    named like the dataclass's fields, so a command does not write each option a third time."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    picked = {k: v for k, v in values.items() if k in names}
    return cls(**{**picked, **changes})


@dataclass(frozen=True)
class RolloutOptions:
    """Flat on purpose, like the command line and the `options` recorded in each rollouts
    file: n ... seed mirror `engines.SamplingSettings` (built from them in `run_rollout`
    with the step's derived seed) rather than nesting it, which would change that record."""

    batch_size: int = 64
    n: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 1024
    max_prompt_tokens: int | None = None
    seed: int = 0
    shard: tuple[int, int] = (0, 1)
    engine: str = "auto"
    chat_template: bool = True
    round: int = 0  # DAPO refill: round k of the step takes further, unused prompts

    def check(self) -> None:
        if self.round < 0:
            raise DcpoError("--round must be >= 0")
        if self.batch_size < 1:
            raise DcpoError("--batch-size must be at least 1")
        if self.n < 1:
            raise DcpoError("--n must be at least 1")
        check_sampling(self.temperature, self.top_p, self.top_k, self.max_new_tokens)
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise DcpoError("--max-prompt-tokens must be at least 1")


@dataclass(frozen=True)
class ScoreOptions:
    workers: int | None = None
    timeout: float = 5.0
    wrong_reward: float = 0.0
    no_answer_reward: float | None = None  # reward of the level no_answer; None: wrong_reward
    overlong_buffer: int = 0
    max_length: int | None = None
    reward: str | None = None  # package.module:function; None: DEFAULT_REWARD

    def check(self) -> None:
        for name, value in (("--wrong-reward", self.wrong_reward),
                            ("--no-answer-reward", self.no_answer_reward)):
            if value is not None and not math.isfinite(value):
                raise DcpoError(f"{name} must be a finite number (got {value})")
        if self.workers is not None and self.workers < 1:
            raise DcpoError("--workers must be at least 1")
        if self.timeout <= 0:
            raise DcpoError("--timeout must be > 0 seconds")
        if self.overlong_buffer < 0:
            raise DcpoError("--overlong-buffer must be >= 0")
        if self.max_length is not None and self.max_length < 1:
            raise DcpoError("--max-length must be at least 1")


@dataclass
class EvalOptions:
    avg_at: int = 0  # K sampled responses per problem; 0 = greedy only
    greedy: bool = True
    pass_at: list[int] = field(default_factory=list)  # extra pass@k values (k <= K)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 3072
    seed: int = 0
    engine: str = "auto"
    instruction: str = PAPER_INSTRUCTION
    instruction_in: str = "system"  # the official layout; "user": appended to the problem
    chat_template: bool = True
    limit: int | None = None

    def check(self) -> None:  # the engine name: `engines.pick_engine`, first thing run_eval does
        check_instruction_in(self.instruction_in)
        if self.avg_at < 0:
            raise DcpoError(f"--avg-at must be 0 or more (got {self.avg_at})")
        if self.avg_at == 0 and not self.greedy:
            raise DcpoError("nothing to evaluate: --no-greedy needs --avg-at K with K >= 1")
        if self.avg_at == 1 and self.greedy:
            raise DcpoError("--avg-at 1 would report a sampled avg@1 beside the greedy avg@1; "
                            "add --no-greedy for a sampled-only avg@1, or use --avg-at 2 or more")
        bad = [k for k in self.pass_at if not 1 <= k <= self.avg_at]
        if bad:
            raise DcpoError(f"--pass-at {bad[0]}: needs 1 <= k <= --avg-at ({self.avg_at})")
        check_sampling(self.temperature, self.top_p, self.top_k, self.max_new_tokens)


@dataclass
class TrainOptions:
    algo: str = "dcpo"
    overrides: dict[str, Any] = field(default_factory=dict)  # AlgoConfig fields to change
    lr: float = 1e-6
    weight_decay: float = 0.1
    warmup_steps: int = 10
    max_grad_norm: float = 1.0
    mini_batch_size: int | None = None  # prompts per update; None: a quarter of the step's
    target_prompts: int | None = None  # DAPO refill: train on the first T kept groups
    micro_batch_tokens: int = 8192
    epochs: int = 1
    seed: int = 0
    gradient_checkpointing: bool = False
    metrics_log: Path | None = None
    chunk_elements: int = CHUNK_ELEMENTS
    # The KL loss's reference policy (used when kl_coef > 0); None: the run's first model.
    ref_model: str | None = None
    rollout_correction: str = "none"  # per-token loss weights from pi_old / pi_sampler
    rollout_correction_cap: float = 2.0
    cpu_offload: bool = False  # FSDP2 offload of parameters, gradients, optimizer state
    keep_training_state: int = 1  # newest checkpoints of the run that keep training_state/
    reset_optimizer: bool = False  # continue a checkpoint with fresh optimizer moments
    # LoRA (through peft): None trains every weight. Defaults: TRL's ModelConfig (alpha 32,
    # dropout 0.05) and verl's target modules (every linear layer but the lm-head).
    lora_rank: int | None = None
    lora_alpha: float = LORA_ALPHA
    lora_dropout: float = LORA_DROPOUT
    lora_target_modules: str = LORA_TARGET_MODULES

    # How the step runs and what is kept, not what it computes: not in the record.
    UNRECORDED = ("metrics_log", "cpu_offload", "keep_training_state")

    def record(self) -> dict[str, Any]:
        """The options that determine the result (recorded in the checkpoint)."""
        return {k: v for k, v in self.__dict__.items() if k not in self.UNRECORDED}

    def check(self) -> None:
        for name, value in (("--micro-batch-tokens", self.micro_batch_tokens),
                            ("--epochs", self.epochs),
                            ("--mini-batch-size",
                             1 if self.mini_batch_size is None else self.mini_batch_size),
                            ("--target-prompts",
                             1 if self.target_prompts is None else self.target_prompts)):
            if value < 1:
                raise DcpoError(f"{name} must be at least 1")
        if self.keep_training_state < 1:
            raise DcpoError("--keep-training-state must be at least 1 (the newest checkpoint "
                            "is the one a run continues from)")
        if self.lr < 0 or self.warmup_steps < 0 or self.max_grad_norm <= 0:
            raise DcpoError("--lr and --warmup-steps must be >= 0 and --max-grad-norm > 0")
        if self.rollout_correction not in ROLLOUT_CORRECTIONS:
            raise DcpoError(f"--rollout-correction must be {choices(ROLLOUT_CORRECTIONS)}, "
                            f"not {self.rollout_correction!r}")
        if not self.rollout_correction_cap > 0:
            raise DcpoError("--rollout-correction-cap must be > 0")
        check_lora(self.lora_rank, self.lora_alpha, self.lora_dropout,
                   self.lora_target_modules)


def check_lora(rank: int | None, alpha: float, dropout: float, targets: str) -> None:
    if rank is not None and rank < 1:
        raise DcpoError(f"--lora-rank must be at least 1 (got {rank}; leave it out to train "
                        "every weight)")
    if rank is not None:
        require("lora", "--lora-rank")
    if not alpha > 0:
        raise DcpoError(f"--lora-alpha must be > 0 (got {alpha})")
    if not 0 <= dropout < 1:
        raise DcpoError(f"--lora-dropout must be in [0, 1) (got {dropout})")
    if not [t for t in str(targets).split(",") if t.strip()]:
        raise DcpoError("--lora-target-modules: name at least one module (or all-linear)")
