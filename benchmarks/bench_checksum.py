"""Which hash a checkpoint's weight checksums use: hashlib's sha256 and blake2b against
xxhash's xxh3_128 (the one dcpo picked), on a 100 MB and a 1 GB file of random bytes,
read in the same 8 MiB blocks `files/weights_checksum.py` reads. Each file is read once
before timing, so all three hash from the page cache (what a load right after a write, or
a re-read checkpoint, sees); the cold read from disk costs the same for all three.

    .venv/bin/python benchmarks/bench_checksum.py --sizes 100,1000
    .venv/bin/python benchmarks/bench_checksum.py --sizes 0 --checkpoint run/ckpt/step-000001

With `--checkpoint`, also the cost of recording and verifying that train-step
checkpoint's checksums beside the train-step that wrote it (its metrics.json `seconds`).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import tempfile
import time
from pathlib import Path

import xxhash

BLOCK = 8 << 20
HASHES = {
    "xxh3_128 (xxhash)": xxhash.xxh3_128,
    "blake2b (hashlib)": hashlib.blake2b,
    "sha256 (hashlib)": hashlib.sha256,
}


def hash_file(path: Path, make) -> str:
    digest = make()
    with open(path, "rb") as handle:
        while block := handle.read(BLOCK):
            digest.update(block)
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000", help="file sizes in MB")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--checkpoint", type=Path, help="a train-step checkpoint directory")
    args = parser.parse_args()
    if args.checkpoint:
        checkpoint_cost(args.checkpoint, args.repeat)
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; median of "
          f"{args.repeat} runs, from the page cache")
    print(f"{'size':>8} {'hash':20} {'seconds':>8} {'GB/s':>7} {'/ xxh3':>7}")
    for size_mb in (int(s) for s in args.sizes.split(",") if int(s) > 0):
        with tempfile.NamedTemporaryFile(dir=tempfile.gettempdir(), delete=True) as handle:
            chunk = os.urandom(BLOCK)
            for _ in range(size_mb * 1_000_000 // BLOCK + 1):
                handle.write(chunk)
            handle.flush()
            path = Path(handle.name)
            hash_file(path, hashlib.md5)  # into the page cache
            seconds = {}
            for name, make in HASHES.items():
                runs = []
                for _ in range(args.repeat):
                    start = time.perf_counter()
                    hash_file(path, make)
                    runs.append(time.perf_counter() - start)
                seconds[name] = statistics.median(runs)
            size = path.stat().st_size
            base = seconds["xxh3_128 (xxhash)"]
            for name, value in seconds.items():
                print(f"{size / 1e6:6.0f}MB {name:20} {value:8.3f} {size / value / 1e9:7.2f} "
                      f"{value / base:7.1f}x")


def checkpoint_cost(directory: Path, repeat: int) -> None:
    """Record + verify of one checkpoint, against the train-step that wrote it."""
    import json

    from dcpo_cli.files import weights_checksum

    step_seconds = json.loads((directory / "metrics.json").read_text())["seconds"]
    size = sum(p.stat().st_size for p in weights_checksum.weight_files(directory))
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        weights_checksum.record(directory)
        weights_checksum._verified.clear()
        weights_checksum.verify(directory)
        runs.append(time.perf_counter() - start)
    cost = statistics.median(runs)
    print(f"{directory}: {size / 1e6:.1f} MB of weights; record + verify {cost:.4f} s, "
          f"train-step {step_seconds:.2f} s: {100 * cost / step_seconds:.2f}%")


if __name__ == "__main__":
    main()
