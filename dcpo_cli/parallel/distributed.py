"""Several processes under torchrun: who this process is, and the few collectives train-step
needs besides FSDP2's own.

One process started without torchrun (no RANK/WORLD_SIZE in the environment) has no process
group: every helper here is then a plain no-op or identity, so the single-process path costs
what it did before. Under torchrun `init()` starts the process group (gloo on CPU, nccl on
GPU) once; rank 0 is the only writer of files.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

# Set by `dcpo train-step --nproc-per-node N` for its workers: rank 0 writes a bad-input
# message here (and every rank exits 0) so the launcher prints one line and exits 2,
# instead of torchrun's multi-page failure report.
ERROR_FILE_ENV = "DCPO_ERROR_FILE"


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    sharded: bool = False  # under torchrun: the model is wrapped with FSDP2

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_world = World()


def launched() -> bool:
    """True in a process started by torchrun (it sets RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def init() -> World:
    """Start the process group if torchrun launched this process (idempotent)."""
    global _world
    if not launched() or _world.sharded:
        return _world
    import torch.distributed as dist

    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
            dist.init_process_group("nccl", device_id=torch.device("cuda", local))
        else:
            dist.init_process_group("gloo")
    _world = World(rank, size, local, True)
    return _world


def world() -> World:
    return _world


def shutdown() -> None:
    global _world
    if _world.sharded:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    _world = World()


def barrier() -> None:
    if _world.sharded:
        import torch.distributed as dist

        dist.barrier()


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sums over ranks (float64, so counts stay exact)."""
    if not _world.sharded or not values:
        return list(values)
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor)
    return tensor.cpu().tolist()


def all_reduce_max(value: float) -> float:
    if not _world.sharded:
        return value
    import torch.distributed as dist

    tensor = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (decisions all ranks must share)."""
    if not _world.sharded:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(work: Callable[[], Any]) -> Any:
    """Run `work` on rank 0 only and hand its result, or its DcpoError, to every rank: for
    decisions that read (and may finish writing) files, such as whether a step is new."""
    from dcpo_cli.errors import DcpoError

    if not _world.sharded:
        return work()
    outcome: tuple[Any, str | None] = (None, None)
    if _world.is_main:
        try:
            outcome = (work(), None)
        except DcpoError as exc:
            outcome = (None, str(exc))
    result, error = broadcast_object(outcome)
    if error is not None:
        raise DcpoError(error)
    return result


def die_here_for_tests(update: int) -> None:
    """TEST HOOK (tests/test_distributed.py): with DCPO_TEST_KILL_AT="RANK:UPDATE" in the
    environment, that rank exits at once (os._exit, as a SIGKILL would leave it) after the
    backward passes of optimizer update UPDATE (1-based), before the optimizer step. It
    simulates a rank lost in the middle of an update; unset, it costs one dict lookup."""
    spec = os.environ.get("DCPO_TEST_KILL_AT")
    if spec and spec == f"{env_rank()}:{update}":
        os._exit(137)


def gather_object(obj: Any) -> list[Any] | None:
    """Every rank's `obj`, in rank order, on rank 0 (None elsewhere)."""
    if not _world.sharded:
        return [obj]
    import torch.distributed as dist

    box = [None] * _world.world_size if _world.is_main else None
    dist.gather_object(obj, box, dst=0)
    return box


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")


def peak_memory() -> dict[str, float]:
    """This rank's peak memory so far: the accelerator's allocator on GPU, else the
    process's resident set (RSS) high-water mark, named so the two are not confused."""
    if torch.cuda.is_available():
        return {"peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30}
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    scale = 1 if sys.platform == "darwin" else 1024
    return {"peak_cpu_rss_gib": peak * scale / 2**30}
