"""The GPU check: `dcpo run` for 3 steps and `dcpo train-step` alone on a random-initialised
model of Qwen2.5-1.5B's shape, on one GPU, in one command (under 8 minutes on an H200):

    python benchmarks/gpu_check.py --out /tmp/gpu-check
    python benchmarks/gpu_check.py --size tiny --out /tmp/cpu-check    # the same on a CPU

Nothing is downloaded: the model is built from Qwen2.5-1.5B's config (written here; bf16,
random weights) with dcpo's byte-level tokenizer padded to Qwen's 151,936-token vocabulary,
and the prompts are the built-in tiny task's. Both runs use the hf engine and FSDP2 on one
rank (`--nproc-per-node 1`), bf16 compute with fp32 master weights, as on a cluster. Needs
only what a stock PyTorch image has besides dcpo's own dependencies.

It prints, as a table and in OUT/gpu_check.json: generation tokens/s, train tokens/s, MFU
(model FLOPs per token, 6N plus attention, over the device's dense bf16 peak: 989 TFLOP/s
on an H100/H200), peak memory, each run step's time split, and a bare forward+backward of
the same model on one micro-batch: the MFU the model's shape and kernels allow, so the
gap to train-step's is dcpo's own overhead. The large files (model, checkpoints: ~50 GB at
the full size, checked before anything runs) go to a temporary work folder, deleted at the
end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Qwen2.5-1.5B's config.json (the Hub's, 2024-09), the fields that shape the compute
QWEN25_15B = {
    "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
    "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936,
    "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
}
# Dense bf16 peaks (no sparsity), FLOP/s, by a substring of torch.cuda.get_device_name()
PEAK_BF16 = [("H200", 989e12), ("H100", 989e12), ("GH200", 989e12), ("H800", 989e12),
             ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12),
             ("L4", 121e12), ("A10", 125e12)]
FIRST_ID = 5  # after the tokenizer's special tokens: random ids are ordinary ones
REWARD = "def parity(response_text, answer, row):\n    return float(len(response_text) % 2)\n"


@dataclass(frozen=True)
class Plan:
    """What runs, at one size."""

    model: dict  # Qwen2Config fields
    steps: int
    batch_size: int  # prompts per run step
    n: int
    max_new_tokens: int
    micro_batch_tokens: int
    train_responses: int  # train-step alone: synthetic responses of train_length tokens
    train_length: int


PLANS = {
    # ~40 s of generation, ~5 s of training per run step on an H200; 3 checkpoints
    "qwen2.5-1.5b": Plan(QWEN25_15B, steps=3, batch_size=32, n=8, max_new_tokens=384,
                         micro_batch_tokens=16384, train_responses=512, train_length=512),
    # the tiny model's default shape (random weights), minutes on 2 CPU cores
    "tiny": Plan({"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 0,
                  "max_position_embeddings": 512, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
                  "tie_word_embeddings": True},
                 steps=3, batch_size=4, n=4, max_new_tokens=16, micro_batch_tokens=2048,
                 train_responses=32, train_length=32),
}


# ---------------------------------------------------------------- FLOPs


def matmul_params(config: dict) -> int:
    """Weights multiplied per token: the decoder's linear layers and the output head (the
    embedding lookup is no matmul)."""
    d, layers = config["hidden_size"], config["num_hidden_layers"]
    head = d // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * head, config["num_key_value_heads"] * head
    per_layer = d * q + 2 * d * kv + q * d + 3 * d * config["intermediate_size"]
    return layers * per_layer + d * config["vocab_size"]


def forward_flops(config: dict, lengths: list[int]) -> float:
    """One forward over sequences of `lengths` tokens: 2 N per token, plus causal attention
    (QK^T and AV: 4 d_attn FLOPs per attended position, each token attending to itself and
    those before it)."""
    d_attn = config["hidden_size"]  # heads * head_dim
    n = matmul_params(config)
    return sum(2 * n * s + config["num_hidden_layers"] * 4 * d_attn * s * (s + 1) / 2
               for s in lengths)


def peak_flops(device: str, override: float | None) -> tuple[float | None, str]:
    if override:
        return override * 1e12, f"{override:g} TFLOP/s (--peak-tflops)"
    import torch

    if device != "cuda":
        return None, "unknown for a CPU (--peak-tflops gives one)"
    name = torch.cuda.get_device_name()
    for key, value in PEAK_BF16:
        if key in name:
            return value, f"{value / 1e12:g} TFLOP/s dense bf16 ({name})"
    return None, f"unknown for {name} (--peak-tflops gives it)"


# ---------------------------------------------------------------- inputs


def build_tokenizer(vocab_size: int):
    """dcpo's byte-level tokenizer (tiny/model.py), its vocabulary padded with unused tokens
    to `vocab_size` (0: as it is), so a random model of Qwen's vocabulary decodes every id."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from dcpo_cli.tiny.model import (
        BOS,
        CHAT_TEMPLATE,
        EOS,
        PAD,
        SPECIAL_TOKENS,
        UNK,
        byte_alphabet,
    )

    tokens = SPECIAL_TOKENS + byte_alphabet()
    tokens += [f"<unused{i}>" for i in range(max(0, vocab_size - len(tokens)))]
    core = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[]))
    core.normalizer = normalizers.NFC()
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK,
        padding_side="left", clean_up_tokenization_spaces=False)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model_dir(directory: Path, plan: Plan, device: str) -> dict:
    """A random-initialised Qwen2 model directory of the plan's shape; returns its config."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tokenizer(plan.model["vocab_size"])
    fields = {**plan.model, "vocab_size": plan.model["vocab_size"] or len(tokenizer)}
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = Qwen2Config(**fields, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, dtype=dtype)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return fields


def synthetic_scored(path: Path, plan: Plan, vocab: int, eos: int, prompt: list[int]) -> Path:
    """Scored responses of exactly train_length tokens (random ids, eos last), half
    rewarded, in groups of the plan's n: train-step's input at a known size."""
    import pyarrow as pa
    import torch

    from dcpo_cli.files import contracts

    generator = torch.Generator().manual_seed(0)
    rows: dict[str, list] = {name: [] for name in contracts.SCORED_COLUMNS}
    for index in range(plan.train_responses):
        response = torch.randint(FIRST_ID, vocab, (plan.train_length - 1,),
                                 generator=generator).tolist() + [eos]
        reward = float(index % 2)
        values = dict(step=0, prompt_id=f"p{index // plan.n}", sample_index=index % plan.n,
                      prompt_text="", prompt_token_ids=prompt, response_text="",
                      response_token_ids=response, response_logprobs=[0.0] * len(response),
                      finish_reason="stop", answer="1", reward=reward, correct=reward > 0,
                      extracted_answer="")
        for key, value in values.items():
            rows[key].append(value)
    schema = pa.schema(list(contracts.SCORED_COLUMNS.items()))
    contracts.write_table(pa.table(rows, schema=schema), path,
                          contracts.make_metadata("scored", "score", step=0))
    return path


# ---------------------------------------------------------------- the runs


def dcpo(args: list[str], env: dict[str, str], log: Path) -> str:
    """`dcpo ARGS` as a user runs it; its output kept in `log`; stops the check on failure."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "dcpo_cli", *args], env=env,
                            capture_output=True, text=True)
    log.write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        sys.exit(f"gpu_check: dcpo {args[0]} failed (exit {result.returncode}, "
                 f"{time.perf_counter() - started:.0f} s); its output: {log}\n"
                 + "\n".join((result.stdout + result.stderr).splitlines()[-15:]))
    return result.stdout


STEP_LINE = re.compile(r"step (\d+): \w+, reward [-\d.]+, ([\d.]+) s, \(generate ([\d.]+) s, "
                       r"score ([\d.]+) s, update ([\d.]+) s\)")


def run_figures(run_dir: Path, stdout: str, config: dict, device: str) -> dict:
    """Per step: wall time and its split, generation and train throughput, peak memory."""
    import pyarrow.parquet as pq

    from dcpo_cli.files.contracts import read_metadata

    walls = {int(m[1]): [float(x) for x in m.groups()[1:]] for m in STEP_LINE.finditer(stdout)}
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = []
    for record in records:
        step = record["step"]
        rollouts = run_dir / "steps" / f"{step:06d}" / "rollouts.parquet"
        table = pq.read_table(rollouts, columns=["prompt_token_ids", "response_token_ids"])
        responses = [len(r) for r in table.column("response_token_ids").to_pylist()]
        prompts = [len(p) for p in table.column("prompt_token_ids").to_pylist()]
        generate = read_metadata(rollouts).get("generate_seconds")
        wall, _, score, _ = walls.get(step, [None] * 4)
        lengths = [p + r for p, r in zip(prompts, responses, strict=True)]
        train_flops = 4 * forward_flops(config, lengths)  # old log-probs + fwd/bwd
        steps.append({
            "step": step, "wall_s": wall, "generate_s": generate, "score_s": score,
            "train_compute_s": record["compute_seconds"],
            "train_load_save_s": record["seconds"] - record["compute_seconds"],
            "generated_tokens": sum(responses),
            "generate_tokens_per_s": sum(responses) / generate if generate else None,
            "train_tokens": sum(lengths),
            "train_tokens_per_s": sum(lengths) / record["compute_seconds"],
            "train_flops": train_flops,
            "peak_memory_gib": record.get("peak_gpu_memory_gib" if device == "cuda"
                                          else "peak_cpu_rss_gib"),
        })
    return {"steps": steps}


def bare_pass(model_dir: Path, config: dict, tokens: int, length: int, device: str) -> dict:
    """Forward + backward (no optimizer) of the same model on one micro-batch of random
    ids, HF's own code and kernels: the MFU this shape allows before anything dcpo does."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).train()
    rows = max(1, tokens // length)
    ids = torch.randint(FIRST_ID, config["vocab_size"], (rows, length), device=device)
    timings = []
    for _ in range(4):  # the first warms the kernels up
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - started)
    seconds = sorted(timings[1:])[1]  # the median of three
    flops = 3 * forward_flops(config, [length] * rows)
    del model, loss
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"tokens": rows * length, "seconds": seconds, "flops": flops}


# ---------------------------------------------------------------- report


def mfu(flops: float | None, seconds: float | None, peak: float | None) -> float | None:
    return flops / seconds / peak if flops and seconds and peak else None


def report(figures: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.width = max(console.width, 120)  # the table whole, even in a narrow log
    peak = figures["peak_flops"]
    table = Table(title=f"dcpo GPU check: {figures['size']} ({figures['parameters'] / 1e6:,.1f} M "
                  f"parameters) on {figures['device_name']}, {figures['date']}")
    for column in ("", "wall s", "generate s", "score s", "train s", "load+save s",
                   "gen tok/s", "train tok/s", "MFU", "peak GiB"):
        table.add_column(column, justify="right", no_wrap=True)

    def cell(value, form=".1f"):
        return "-" if value is None else format(value, form)

    for s in figures["run"]["steps"]:
        table.add_row(f"run {s['step']}", cell(s["wall_s"]), cell(s["generate_s"]),
                      cell(s["score_s"]), cell(s["train_compute_s"]),
                      cell(s["train_load_save_s"]), cell(s["generate_tokens_per_s"], ",.0f"),
                      cell(s["train_tokens_per_s"], ",.0f"),
                      cell(mfu(s["train_flops"], s["train_compute_s"], peak), ".1%"),
                      cell(s["peak_memory_gib"], ".1f"))
    alone = figures["train_step"]
    table.add_row("train-step", "-", "-", "-", cell(alone["compute_s"]),
                  cell(alone["load_save_s"]), "-", cell(alone["tokens_per_s"], ",.0f"),
                  cell(alone["mfu"], ".1%"), cell(alone["peak_memory_gib"], ".1f"))
    bare = figures["bare"]
    table.add_row("bare fwd+bwd", "-", "-", "-", cell(bare["seconds"], ".2f"), "-", "-",
                  cell(bare["tokens"] / bare["seconds"], ",.0f"), cell(bare["mfu"], ".1%"),
                  "-")
    console.print(table)
    console.print(f"peak: {figures['peak_note']}; total {figures['total_seconds']:.0f} s")
    for line in figures["limits"]:
        console.print(f"- {line}", highlight=False)
    console.print(f"figures: {out}")


def limits(figures: dict) -> list[str]:
    """What holds MFU down, from the measurements."""
    alone, bare = figures["train_step"], figures["bare"]
    lines = []
    if alone["mfu"] is None:
        return ["MFU needs the device's peak FLOP/s (--peak-tflops)"]
    lines.append(f"a bare forward+backward of this shape reaches {bare['mfu']:.0%} (HF's "
                 f"kernels; hidden size {figures['config']['hidden_size']}: small matmuls "
                 f"keep a GPU below its peak); train-step {alone['mfu']:.0%}, i.e. "
                 f"{alone['mfu'] / bare['mfu']:.0%} of it")
    lines.append(f"train-step's pass over {alone['tokens']:,} tokens counts old log-probs + "
                 "forward/backward (4 forwards' FLOPs); its time also holds the AdamW steps "
                 f"({alone['updates']} updates over fp32 master weights) and FSDP2's "
                 "all-gathers/reduce-scatters (copies on one rank)")
    gen = [s["generate_s"] / s["wall_s"] for s in figures["run"]["steps"]
           if s["generate_s"] and s["wall_s"]]
    if gen:
        lines.append(f"in `dcpo run`, generation is {sum(gen) / len(gen):.0%} of a step's wall "
                     "time (the hf engine decodes one token per forward; vLLM is the fast "
                     "engine on GPUs)")
    return lines


# ---------------------------------------------------------------- main


def disk_needed(plan: Plan) -> float:
    """Bytes the check writes at its peak: the base model and a run's checkpoints in bf16
    (2 bytes a parameter), two training states at once (fp32 master weights and AdamW's
    two moments: 12 bytes a parameter; the newest is written before the one before it
    goes), and a margin."""
    config = {**plan.model, "vocab_size": plan.model["vocab_size"] or 261}
    parameters = matmul_params(config)
    return parameters * (2 * (plan.steps + 1) + 2 * 12) * 1.1


def pick_work_dir(given: Path | None, out: Path, needed: float) -> Path:
    """--work, else a new temporary folder where there is room: the system's temporary
    folder, else beside --out."""
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
        places = [given]
    else:
        places = [Path(tempfile.gettempdir()), out]
    for place in places:
        if shutil.disk_usage(place).free >= needed:
            if given is not None:
                return given.resolve()
            return Path(tempfile.mkdtemp(prefix="dcpo-gpu-check-", dir=place)).resolve()
    sys.exit(f"gpu_check: needs {needed / 1e9:.0f} GB of free disk for the model and its "
             f"checkpoints; {', '.join(str(p) for p in places)} "
             f"{'has' if len(places) == 1 else 'have'} less: pass --work DIR on a larger disk")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu-check"),
                        help="folder for gpu_check.json and the runs' logs")
    parser.add_argument("--size", choices=sorted(PLANS), default="qwen2.5-1.5b")
    parser.add_argument("--work", type=Path, default=None,
                        help="folder for the model and checkpoints (~50 GB at the full size; "
                        "default: a new temporary folder, deleted at the end)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's dense bf16 peak, when not in the built-in list")
    args = parser.parse_args()

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the check's own lines stay readable
    started = time.perf_counter()
    plan = PLANS[args.size]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.size != "tiny" and device != "cuda":
        sys.exit("gpu_check: no GPU here; --size tiny runs the check on a CPU")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = pick_work_dir(args.work, out, disk_needed(plan))
    try:
        figures = check(plan, args.size, device, out, work, args.peak_tflops, started)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    (out / "gpu_check.json").write_text(json.dumps(figures, indent=2) + "\n")
    report(figures, out / "gpu_check.json")


def check(plan: Plan, size: str, device: str, out: Path, work: Path,
          peak_tflops: float | None, started: float) -> dict:
    import datetime

    import torch

    from dcpo_cli.tiny.build import init_tiny

    print(f"gpu_check: building a random {size} model in {work} ...", flush=True)
    config = build_model_dir(work / "model", plan, device)
    init_tiny(work / "task", seed=0, size="default")  # the prompts (prebuilt: a copy)
    (work / "reward").mkdir()
    (work / "reward" / "gpu_check_reward.py").write_text(REWARD)
    env = {**os.environ, "COLUMNS": "200",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), str(work / "reward"),
                                                      os.environ.get("PYTHONPATH")]))}
    common = ["--nproc-per-node", "1"]

    print(f"gpu_check: dcpo run, {plan.steps} steps ...", flush=True)
    run_dir = work / "run"
    stdout = dcpo(["run", str(run_dir), "--model", str(work / "model"), "--prompts",
                   str(work / "task" / "train.parquet"), "--steps", str(plan.steps),
                   "--batch-size", str(plan.batch_size), "--n", str(plan.n),
                   "--max-new-tokens", str(plan.max_new_tokens), "--engine", "hf",
                   "--reward", "gpu_check_reward:parity", "--lr", "1e-6",
                   "--set", f"train.micro_batch_tokens={plan.micro_batch_tokens}", *common],
                  env, out / "run.log")
    run = run_figures(run_dir, stdout, config, device)
    shutil.rmtree(run_dir / "ckpt", ignore_errors=True)  # ~20 GB a checkpoint at full size

    print("gpu_check: dcpo train-step alone ...", flush=True)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "1+2*3"}],
                                         add_generation_prompt=True, tokenize=False)
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    scored = synthetic_scored(work / "scored.parquet", plan, config["vocab_size"],
                              tokenizer.eos_token_id, prompt)
    dcpo(["train-step", "--model", str(work / "model"), "--scored", str(scored),
          "--state", str(work / "ts" / "state.json"), "--out", str(work / "ts" / "ckpt"),
          "--metrics-log", str(work / "ts" / "metrics.jsonl"), "--lr", "1e-6",
          "--micro-batch-tokens", str(plan.micro_batch_tokens), *common],
         env, out / "train_step.log")
    record = json.loads((work / "ts" / "metrics.jsonl").read_text().splitlines()[-1])
    lengths = [len(prompt) + plan.train_length] * plan.train_responses
    forwards = 5 if record.get("kl_ref") is not None else 4  # + the reference's forward
    flops = forwards * forward_flops(config, lengths)
    peak, peak_note = peak_flops(device, peak_tflops)
    alone = {"tokens": sum(lengths), "flops": flops, "compute_s": record["compute_seconds"],
             "load_save_s": record["seconds"] - record["compute_seconds"],
             "tokens_per_s": sum(lengths) / record["compute_seconds"],
             "mfu": mfu(flops, record["compute_seconds"], peak),
             "updates": record.get("optimizer_updates"),
             "peak_memory_gib": record.get("peak_gpu_memory_gib" if device == "cuda"
                                           else "peak_cpu_rss_gib")}

    print("gpu_check: a bare forward+backward ...", flush=True)
    bare = bare_pass(work / "model", config, plan.micro_batch_tokens,
                     len(prompt) + plan.train_length, device)
    bare["mfu"] = mfu(bare["flops"], bare["seconds"], peak)
    figures = {
        "size": size, "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else "CPU",
        "date": datetime.date.today().isoformat(), "torch": torch.__version__,
        "plan": asdict(plan), "config": config,
        "parameters": matmul_params(config) + config["hidden_size"] * config["vocab_size"]
        * (0 if config["tie_word_embeddings"] else 1),
        "flops_per_token_forward": 2 * matmul_params(config),
        "peak_flops": peak, "peak_note": peak_note,
        "run": run, "train_step": alone, "bare": bare,
    }
    figures["limits"] = limits(figures)
    figures["total_seconds"] = time.perf_counter() - started
    return figures


if __name__ == "__main__":
    main()
