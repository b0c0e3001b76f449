"""`dcpo run --max-staleness K`: generation for step s + K in a worker process while step s
trains here.

The worker holds its own engine (its own copy of the weights, its own RNG: the hf engine
seeds torch's global generator per batch, which must not touch the trainer's) and runs the
loop's own `Sampler`: rollouts from the checkpoint it is given, scored, each file written
atomically and skipped when already there. The lag is fixed, so which policy samples which
step never depends on timing: the files equal those of the same schedule run stage after
stage (`LAG=K examples/tiny_loop.sh`). On a CPU the cores are split between the two sides
(torch threads); with GPUs, give generation its own devices (`dcpo serve`, docs/loop.md).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from dcpo_cli.errors import DcpoError


def split_threads() -> tuple[int, int]:
    """(trainer, generation) torch threads: the cores shared out, unless OMP_NUM_THREADS is
    set (then each side gets that many)."""
    if os.environ.get("OMP_NUM_THREADS"):
        threads = max(1, int(os.environ["OMP_NUM_THREADS"]))
        return threads, threads
    from dcpo_cli.parallel.processes import cores

    total = cores()
    generation = max(1, total // 2)
    return max(1, total - generation), generation


class GenerationWorker:
    """A process sampling and scoring steps ahead of the trainer: `submit` a step, `collect`
    its scored files later (`inputs`: both at once)."""

    def __init__(self, run_dir: Path, settings: Any, prompts: Path) -> None:
        import multiprocessing

        import torch

        from dcpo_cli.console import err

        trainer, generation = split_threads()
        torch.set_num_threads(trainer)
        context = multiprocessing.get_context("spawn")  # no forked torch or CUDA state
        self._conn, child = context.Pipe()
        self._process = context.Process(
            target=_work, args=(child, Path(run_dir), settings, Path(prompts), generation),
            name="dcpo-generation")  # not daemonic: the scoring pool is its child
        self._process.start()
        child.close()
        err.print(f"[dim]generation overlapped with training (--max-staleness "
                  f"{settings.train.max_staleness}): a worker process with {generation} "
                  f"thread(s), training with {trainer}[/]", highlight=False)

    def submit(self, step: int, model: Any) -> None:
        self._conn.send(("inputs", step, str(model)))

    def collect(self, timing: Any) -> list[Path]:
        """The scored files of the step submitted last; its stage times go into `timing`."""
        while not self._conn.poll(0.5):
            if not self._process.is_alive():
                raise DcpoError("the generation worker died (exit code "
                                f"{self._process.exitcode}); re-run to resume")
        try:
            kind, *payload = self._conn.recv()
        except EOFError:
            raise DcpoError("the generation worker died; re-run to resume") from None
        if kind == "error":
            raise DcpoError(payload[0])
        paths, timing.generate, timing.score = payload
        return [Path(p) for p in paths]

    def inputs(self, step: int, model: Any, timing: Any) -> list[Path]:
        self.submit(step, model)
        return self.collect(timing)

    def close(self) -> None:
        if self._process.is_alive():
            with contextlib.suppress(BrokenPipeError, OSError):
                self._conn.send(("stop",))
            self._process.join(timeout=30)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()


def _work(conn: Any, run_dir: Path, settings: Any, prompts: Path, threads: int) -> None:
    """The worker process: its own engine and Sampler, one request at a time."""
    from dcpo_cli import console, quiet
    from dcpo_cli.parallel.processes import die_with_parent

    die_with_parent()
    quiet.configure()
    console.err.quiet = console.out.quiet = True  # would interleave with the trainer's
    import torch

    torch.set_num_threads(threads)
    from dcpo_cli.engines import pick_engine
    from dcpo_cli.run.resident import ResidentEngine
    from dcpo_cli.run.sampling import Sampler, StepTiming

    engines = ResidentEngine(pick_engine(settings.rollout.engine), settings.engine,
                             settings.train.lora_rank, settings.server_address)
    sampler = Sampler(run_dir, settings, prompts, engines)
    try:
        while True:
            request = conn.recv()
            if request[0] == "stop":
                return
            _, step, model = request
            timing = StepTiming(step, 0.0)
            try:
                paths = sampler.step_inputs(step, model, timing)
            except DcpoError as exc:
                conn.send(("error", str(exc)))
            except Exception as exc:  # noqa: BLE001  one line in the trainer, as the CLI does
                conn.send(("error", f"generation worker: unexpected {type(exc).__name__}: "
                           f"{exc}"))
            else:
                conn.send(("ok", [str(p) for p in paths], timing.generate, timing.score))
    except (EOFError, KeyboardInterrupt):
        return
    finally:
        engines.close()
