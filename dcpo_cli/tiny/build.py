"""The built-in default: a tiny Qwen2 policy warm-started on a verifiable arithmetic task.

`init_tiny(DIR)` writes, atomically (for seed 0 and the default size it copies the prebuilt
files shipped in dcpo_cli/data/tiny, which are this code's output; `rebuild=True` trains
them again):
  DIR/model/          a Hugging Face model directory (tiny/model.py), after a short SFT
  DIR/train.parquet   prompts (the prompts contract), for RL
  DIR/test.parquet    held-out prompts (different expressions), for `dcpo eval`
  DIR/summary.json    how the initial policy samples, and the loop settings to use

The task: short digit expressions (a+b, a*b, a+b+c, a*b+c, (a+b)*c). A response either
works it out ("6*5=30, 30+4=34. \\boxed{34}") or answers directly ("\\boxed{34}"). The
warm-start data is deliberately imperfect: some two-step solutions stop after the first step
and box its result, and some final numbers slip by a little. The policy therefore starts in
the right format, often wrong, and knowing more than it samples (greedy decoding beats
sampling), so RL can raise its accuracy within minutes: finish both steps, prefer worked
solutions, trust the right digit.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dcpo_cli.options import TINY_SIZES
from dcpo_cli.tiny.model import DEFAULT_SIZE, TEST_SIZE, TinySize
from dcpo_cli.tiny.prebuilt import (  # noqa: F401  (re-exported)
    PREBUILT_FILES,
    PREBUILT_OPTIONS,
    TinyResult,
    build_environment,
    copy_prebuilt,
    prebuilt_source,
    refresh_prebuilt,
)

# Generation settings the RL loop and `dcpo eval` should use on the tiny task.
TINY_MAX_NEW_TOKENS = 48
TINY_TEMPERATURE = 1.0
TINY_SUMMARY_SAMPLES = 8  # responses per test prompt in the initial-policy summary
# Loop settings that make the demo learn within minutes on 2 CPU cores.
TINY_LOOP = {"batch_size": 32, "n": 8, "lr": 2e-4, "warmup_steps": 0,
             "max_new_tokens": TINY_MAX_NEW_TOKENS, "temperature": TINY_TEMPERATURE}

INSTRUCTION = "Answer in \\boxed{}."
SUMMARY_FORMAT = "dcpo-tiny-summary"



@dataclass(frozen=True)
class TinyConfig:
    about: str  # for --size's help
    model: TinySize
    test_fraction: float  # of each family's expressions, held out
    sft_steps: int
    sft_batch: int
    sft_lr: float


CONFIGS = {
    "default": TinyConfig(about="the ~0.8 M parameter demo model", model=DEFAULT_SIZE,
                          test_fraction=0.15, sft_steps=700, sft_batch=32, sft_lr=3e-3),
    "test": TinyConfig(about="a reduced configuration that trains in seconds", model=TEST_SIZE,
                       test_fraction=0.02, sft_steps=12, sft_batch=16, sft_lr=3e-3),
}
assert tuple(CONFIGS) == TINY_SIZES, "options.TINY_SIZES names the sizes"

# The deliberate imperfections of the warm-start solutions. A two-step solution sometimes
# stops after its first step and boxes that intermediate result (a habit RL can unlearn for
# every problem at once); any solution sometimes slips in its final number.
WORKED_SHARE = 0.5  # share of solutions written out step by step; the rest answer directly
SKIP_RATE = 0.3  # two-step problems: box the first step's result
SLIP_RATE = {"worked": 0.08, "direct": 0.15}  # final number off by a little


@dataclass(frozen=True)
class Problem:
    family: str
    expression: str
    steps: tuple[tuple[str, int], ...]  # worked steps ("3+8", 11); the last one is the answer

    @property
    def answer(self) -> int:
        return self.steps[-1][1]


def _step(a: int, op: str, b: int) -> tuple[str, int]:
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    return f"{a}{op}{b}", value


def all_problems() -> list[Problem]:
    """Every expression of the task (730), in a fixed order. Operands are digits and every
    worked step is one of about 230 small facts, few enough for a couple of minutes of SFT."""
    digits, small = range(1, 10), range(2, 7)
    problems = [Problem("add", f"{a}+{b}", (_step(a, "+", b),)) for a in digits for b in digits]
    problems += [Problem("mul", f"{a}*{b}", (_step(a, "*", b),)) for a in small for b in small]
    problems += [Problem("add3", f"{a}+{b}+{c}", (_step(a, "+", b), _step(a + b, "+", c)))
                 for a in digits for b in digits if a + b < 10 for c in digits]
    problems += [Problem("mul_add", f"{a}*{b}+{c}", (_step(a, "*", b), _step(a * b, "+", c)))
                 for a in small for b in small for c in digits]
    problems += [Problem("add_mul", f"({a}+{b})*{c}", (_step(a, "+", b), _step(a + b, "*", c)))
                 for a in digits for b in digits if a + b < 7 for c in small]
    return problems


def split_problems(problems: list[Problem], test_fraction: float,
                   rng: random.Random) -> tuple[list[Problem], list[Problem]]:
    """Hold out `test_fraction` of each family's expressions (at least one) for the test
    set; the rest is the train set. Every expression occurs once in `problems`, so the sets
    are disjoint. Held-out one-step facts still appear as worked steps of two-step train
    problems, so the test set measures composition, not recall."""
    train: list[Problem] = []
    test: list[Problem] = []
    for family in sorted({p.family for p in problems}):
        group = [p for p in problems if p.family == family]
        rng.shuffle(group)
        count = max(1, round(test_fraction * len(group)))
        test += group[:count]
        train += group[count:]
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def prompt_content(problem: Problem) -> str:
    return f"What is {problem.expression}? {INSTRUCTION}"


def _near_miss(value: int, rng: random.Random) -> int:
    """A plausible wrong result: off by one or two, or by ten (a slipped carry)."""
    while True:
        wrong = value + rng.choice((-10, -2, -1, 1, 1, 2, 10))
        if wrong >= 0:
            return wrong


def solution_text(problem: Problem, style: str, wrong_answer: int | None = None) -> str:
    """A response: the worked steps (when `style` is "worked") then the boxed result.
    `wrong_answer` replaces the last step's result, as a slip in the final computation."""
    final = problem.answer if wrong_answer is None else wrong_answer
    if style == "direct":
        return f"\\boxed{{{final}}}"
    results = [value for _, value in problem.steps[:-1]] + [final]
    worked = ", ".join(f"{expr}={value}" for (expr, _), value in zip(problem.steps, results,
                                                                      strict=True))
    return f"{worked}. \\boxed{{{final}}}"


def sample_solution(problem: Problem, rng: random.Random) -> tuple[str, bool]:
    """One warm-start response for `problem` and whether its answer is right."""
    style = "worked" if rng.random() < WORKED_SHARE else "direct"
    draw = rng.random()
    if len(problem.steps) > 1 and draw < SKIP_RATE:
        first = Problem(problem.family, problem.expression, problem.steps[:1])
        return solution_text(first, style), False
    if draw > 1 - SLIP_RATE[style]:
        return solution_text(problem, style, _near_miss(problem.answer, rng)), False
    return solution_text(problem, style), True


def prompt_rows(problems: list[Problem]) -> list[dict[str, Any]]:
    """Rows of the prompts contract (`dcpo_cli.stages.prepare.prompts_table`). The tiny task keeps
    its own layout (one user message), not `dcpo prepare`'s official default: the prebuilt
    model was trained on it."""
    return [{"prompt_id": f"tiny/{p.expression}",
             "prompt": [{"role": "user", "content": prompt_content(p)}],
             "answer": str(p.answer), "problem": p.expression, "source": f"tiny-{p.family}"}
            for p in problems]


# ---------------------------------------------------------------- supervised warm start


def sft_batch(tokenizer, pairs: list[tuple[list[int], list[int]]]):
    """Right-padded (input_ids, attention_mask, labels); labels are -100 outside responses,
    so the loss is on the response tokens (and their final eos) only."""
    import torch

    width = max(len(p) + len(r) for p, r in pairs)
    pad = tokenizer.pad_token_id
    ids, mask, labels = [], [], []
    for prompt, response in pairs:
        tokens = prompt + response
        fill = width - len(tokens)
        ids.append(tokens + [pad] * fill)
        mask.append([1] * len(tokens) + [0] * fill)
        labels.append([-100] * len(prompt) + response + [-100] * fill)
    return torch.tensor(ids), torch.tensor(mask), torch.tensor(labels)


def lr_at(step: int, total: int, peak: float, warmup: int = 10) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def warm_start(model, tokenizer, problems: list[Problem], config: TinyConfig, seed: int,
               on_step=None) -> float:
    """Supervised fine-tuning on sampled solutions; returns the mean loss of the last steps."""
    import torch

    from dcpo_cli.engines.prompting import encode_prompts

    rng = random.Random(f"sft-{seed}")
    encoded = encode_prompts(tokenizer, [[{"role": "user", "content": prompt_content(p)}]
                                         for p in problems])
    prompt_ids = [ids for _, ids in encoded]
    families = sorted({p.family for p in problems})
    by_family = {f: [i for i, p in enumerate(problems) if p.family == f] for f in families}
    eos = tokenizer.eos_token_id
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.sft_lr, weight_decay=0.01,
                                  betas=(0.9, 0.98))
    model.train()
    recent: list[float] = []
    for step in range(config.sft_steps):
        pairs = []
        for _ in range(config.sft_batch):
            # Families are drawn evenly: the few one-step facts every other family builds on
            # are then seen as often as the many two-step expressions.
            index = rng.choice(by_family[rng.choice(families)])
            text, _ = sample_solution(problems[index], rng)
            response = tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
            pairs.append((prompt_ids[index], response))
        input_ids, mask, labels = sft_batch(tokenizer, pairs)
        logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 labels[:, 1:].reshape(-1), ignore_index=-100)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config.sft_steps, config.sft_lr)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        recent = (recent + [loss.item()])[-10:]
        if on_step:
            on_step(step + 1, loss.item())
    model.eval()
    return sum(recent) / len(recent)


# ---------------------------------------------------------------- initial-policy summary


def policy_figures(families: list[str], outcomes: list[list[tuple[bool, bool, int]]]
                   ) -> dict[str, Any]:
    """Accuracy figures from per-prompt lists of (correct, boxed, response tokens)."""

    def figures(groups: list[list[tuple[bool, bool, int]]]) -> dict[str, Any]:
        flat = [o for group in groups for o in group]
        right = [sum(c for c, _, _ in group) for group in groups]
        return {
            "prompts": len(groups),
            "responses": len(flat),
            "accuracy": sum(c for c, _, _ in flat) / len(flat),
            "boxed_fraction": sum(b for _, b, _ in flat) / len(flat),
            "mixed_fraction": sum(0 < r < len(g) for r, g in zip(right, groups,
                                                                  strict=True)) / len(groups),
            "always_right_fraction": sum(r == len(g) for r, g in zip(right, groups,
                                                                      strict=True)) / len(groups),
            "never_right_fraction": sum(r == 0 for r in right) / len(groups),
            "mean_response_tokens": sum(n for _, _, n in flat) / len(flat),
        }

    result = figures(outcomes)
    result["by_family"] = {
        family: figures([g for f, g in zip(families, outcomes, strict=True) if f == family])
        for family in sorted(set(families))
    }
    return result


def sample_initial_policy(model_dir: Path, rows: list[dict[str, Any]], seed: int,
                          on_progress=None) -> dict[str, Any]:
    """Sample the saved policy on the test prompts (shared engine and scorer) and measure."""
    from dcpo_cli.engines import SamplingSettings, load_engine
    from dcpo_cli.engines.prompting import encode_prompts
    from dcpo_cli.rewards import verify_batch

    engine = load_engine("hf", model_dir)
    encoded = encode_prompts(engine.tokenizer, [row["prompt"] for row in rows])
    settings = SamplingSettings(n=TINY_SUMMARY_SAMPLES, temperature=TINY_TEMPERATURE,
                                max_new_tokens=TINY_MAX_NEW_TOKENS, seed=seed)
    completions = engine.generate([ids for _, ids in encoded], settings, on_progress)
    flat = [c for group in completions for c in group]
    answers = [row["answer"] for row in rows for _ in range(TINY_SUMMARY_SAMPLES)]
    verdicts = verify_batch([c.text for c in flat], answers)
    outcomes = [(v.correct, v.extracted is not None, len(c.token_ids))
                for c, v in zip(flat, verdicts, strict=True)]
    per_prompt = [outcomes[i:i + TINY_SUMMARY_SAMPLES]
                  for i in range(0, len(outcomes), TINY_SUMMARY_SAMPLES)]
    figures = policy_figures([row["source"] for row in rows], per_prompt)
    figures.update(samples_per_prompt=TINY_SUMMARY_SAMPLES, temperature=TINY_TEMPERATURE,
                   max_new_tokens=TINY_MAX_NEW_TOKENS, seed=seed)
    return figures


# ---------------------------------------------------------------- the whole init


def init_tiny(directory: str | Path, seed: int = 0, size: str = "default",
              rebuild: bool = False) -> TinyResult:
    """Write DIR (see the module docstring) atomically: nothing appears unless all of it
    was written. Seed 0 at the default size copies the prebuilt files unless `rebuild`."""
    from dcpo_cli.errors import DcpoError

    if size not in CONFIGS:
        raise DcpoError(f"--size {size!r}: expected one of {', '.join(CONFIGS)}")
    directory = Path(directory)
    if directory.is_file():
        raise DcpoError(f"{directory}: is a file, expected a new directory")
    if directory.is_dir() and any(directory.iterdir()):
        raise DcpoError(f"{directory}: already exists and is not empty; choose a new directory")
    if not rebuild and {"seed": seed, "size": size} == PREBUILT_OPTIONS:
        return copy_prebuilt(directory)
    return build_tiny(directory, seed, size)


def build_tiny(directory: Path, seed: int, size: str) -> TinyResult:
    """Train the tiny model from scratch and write DIR (about 2.5 min on 2 cores by default)."""
    import torch
    from transformers.utils import logging as hf_logging

    from dcpo_cli.console import progress
    from dcpo_cli.files import contracts
    from dcpo_cli.stages.prepare import prompts_table
    from dcpo_cli.tiny.model import build_model, build_tokenizer, save_model_dir

    config = CONFIGS[size]
    hf_logging.disable_progress_bar()  # ours is the one on screen
    started = time.perf_counter()
    train, test = split_problems(all_problems(), config.test_fraction,
                                 random.Random(f"split-{seed}"))
    train_rows, test_rows = prompt_rows(train), prompt_rows(test)
    options = {"seed": seed, "size": size}

    with contracts.atomic_path(directory) as tmp, progress(transient=True) as bar:
        tmp.mkdir()
        for name, rows in (("train", train_rows), ("test", test_rows)):
            metadata = contracts.make_metadata("prompts", "tiny", options=options,
                                           extra={"split": name})
            contracts.write_table(prompts_table(rows), tmp / f"{name}.parquet", metadata)

        tokenizer = build_tokenizer()
        model = build_model(tokenizer, config.model, seed)
        torch.manual_seed(seed)
        task = bar.add_task("warm start (SFT)", total=config.sft_steps, info="")
        final_loss = warm_start(
            model, tokenizer, train, config, seed,
            on_step=lambda step, loss: bar.update(task, completed=step, info=f"loss {loss:.3f}"))
        save_model_dir(model, tokenizer, tmp / "model")

        total = len(test_rows) * TINY_SUMMARY_SAMPLES
        task = bar.add_task("sampling the initial policy", total=total, info="")
        policy = sample_initial_policy(
            tmp / "model", test_rows, seed,
            on_progress=lambda done, tokens: bar.update(task, completed=done,
                                                        info=f"{tokens} tok"))
        summary = {
            "format": SUMMARY_FORMAT,
            "version": 1,
            "seed": seed,
            "size": size,
            "parameters": sum(p.numel() for p in model.parameters()),
            "train_prompts": len(train_rows),
            "test_prompts": len(test_rows),
            "sft": {"steps": config.sft_steps, "batch_size": config.sft_batch,
                    "lr": config.sft_lr, "final_loss": round(final_loss, 6),
                    "worked_share": WORKED_SHARE, "skip_rate": SKIP_RATE,
                    "slip_rate": SLIP_RATE},
            "initial_policy": policy,
            "loop": TINY_LOOP,
        }
        contracts.write_json(summary, tmp / "summary.json")
    return TinyResult(directory, summary, time.perf_counter() - started)
