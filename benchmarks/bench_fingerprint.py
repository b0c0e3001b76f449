"""Rollout start-up: the model fingerprint written into every rollouts file, old against new.

    .venv/bin/python benchmarks/bench_fingerprint.py [--layers 9] [--repeats 5]

The old fingerprint hashed every weight byte (about 10 s per step at 7B); the new one,
`model_source.model_identity`, reads only small files and stats the weights. Target: under
0.1 s on a ~100 MB random-init Qwen2 model, for a plain directory, a dcpo checkpoint and a
Hub snapshot alike. (The old figure is with the weights in the page cache, its best case.)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import time
from pathlib import Path


def old_fingerprint(model_dir: Path) -> str:
    """What rollout did before: sha256 over each weight file's name and full bytes."""
    digest = hashlib.sha256()
    for path in sorted(p for p in model_dir.iterdir() if p.suffix == ".safetensors"):
        file_digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda h=handle: h.read(1 << 20), b""):
                file_digest.update(block)
        digest.update(path.name.encode())
        digest.update(file_digest.hexdigest().encode())
    return digest.hexdigest()


def best_of(repeats: int, function) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=9, help="9 layers of width 512: ~110 MB")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import torch
    from rich.console import Console
    from rich.table import Table
    from transformers.utils import logging as hf_logging

    from dcpo_cli.files.model_source import ModelSource, model_identity
    from dcpo_cli.tiny.model import TinySize, build_model, build_tokenizer

    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    size = TinySize(hidden_size=512, num_layers=args.layers, num_heads=8, num_kv_heads=2,
                    intermediate_size=1536, max_positions=512)
    model = build_model(tokenizer, size)
    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / "model"
        model.save_pretrained(plain, safe_serialization=True)
        tokenizer.save_pretrained(plain)
        megabytes = sum(p.stat().st_size for p in plain.glob("*.safetensors")) / 1e6
        checkpoint = Path(tmp) / "ckpt"
        checkpoint.mkdir()
        for item in plain.iterdir():
            (checkpoint / item.name).hardlink_to(item)
        (checkpoint / "trainer_state.json").write_text(json.dumps(
            {"format": "dcpo-trainer-state", "global_step": 1, "scored_checksums": ["0" * 64]}))
        hub = ModelSource("org/name", plain, "org/name", None, "a" * 40)

        old = best_of(args.repeats, lambda: old_fingerprint(plain))
        rows = [("old: sha256 of every weight byte", old)]
        for label, source in (("new: plain directory", plain), ("new: dcpo checkpoint",
                              checkpoint), ("new: Hub snapshot", hub)):
            rows.append((label, best_of(args.repeats, lambda s=source: model_identity(s))))

    table = Table(title=f"model fingerprint, {megabytes:.0f} MB of safetensors "
                        f"(best of {args.repeats})")
    table.add_column("method")
    table.add_column("seconds", justify="right")
    table.add_column("vs old", justify="right")
    for label, seconds in rows:
        table.add_row(label, f"{seconds:.4f}", f"{old / max(seconds, 1e-9):,.0f}x")
    Console().print(table)
    worst = max(seconds for label, seconds in rows[1:])
    print(f"target: new fingerprint under 0.1 s: {'met' if worst < 0.1 else 'MISSED'} "
          f"(worst {worst:.4f} s)")


if __name__ == "__main__":
    main()
