"""`dcpo run` under torchrun: every rank trains its FSDP2 shard and generates with its own
engine; rank 0 alone decides and writes.

The loop runs on every rank, but each file stage (rollout, score, eval, the tiny model's
build) runs on rank 0 only, through `on_leader`: while rank 0 works, the other ranks serve
its generation calls (`serve`). When the rollout or eval on rank 0 asks its engine for
anything, the `LeaderEngine` it was given sends the request to every rank first:

- ("hold", model_dir): every rank makes its engine hold `model_dir`'s weights (the same
  decision everywhere, since every rank has the same engine and resident policy): reuse it,
  push the resident policy's weights into it (gathered from the FSDP2 shards one tensor at
  a time, `fsdp.full_weights`: a collective every rank runs in the same order), or load a
  new one from the checkpoint;
- ("generate", model_dir, prompts, settings): every rank generates its share of the
  prompts (`engine.generate_part`; the ranks of one tensor-parallel group the same share),
  and rank 0 gathers the shares into the result `generate` would have given.

So rank 0's stage functions are the one-process ones, unchanged: the same decisions (skip a
finished file), the same files, written once. Then train-step runs on every rank, as
`train-step` under torchrun does. A DcpoError on rank 0 reaches every rank (each then
exits as `train-step`'s ranks do on a bad input); a rank that dies takes the job down
(torchrun), and what was not committed is not there.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from dcpo_cli.errors import DcpoError
from dcpo_cli.parallel import distributed

_DONE = "done"


def data_parallel_part(tensor_parallel_size: int) -> tuple[int, int]:
    """This rank's share of each generation: (its engine group, the number of groups)."""
    world = distributed.world()
    return world.rank // tensor_parallel_size, world.world_size // tensor_parallel_size


def on_leader(work: Callable[[], Any], engines: Any, resident: Callable[[], Any]) -> Any:
    """`work()` on rank 0 while the others serve its generation requests; its result (or
    its DcpoError) on every rank. One process: just `work()`."""
    world = distributed.world()
    if not world.sharded:
        return work()
    if not world.is_main:
        kind, result, error = serve(engines, resident)
    else:
        result, error = None, None
        try:
            result = work()
        except DcpoError as exc:
            error = str(exc)
        except BaseException:
            distributed.broadcast_object((_DONE, None, "rank 0 failed (its error above)"))
            raise
        distributed.broadcast_object((_DONE, result, error))
    if error is not None:
        raise DcpoError(error)
    return result


def serve(engines: Any, resident: Callable[[], Any]) -> tuple[str, Any, str | None]:
    """A follower rank: carry out rank 0's requests until it is done with its stage."""
    while True:
        request = distributed.broadcast_object(None)
        if request[0] == _DONE:
            return request
        if request[0] == "hold":
            engines.holding(request[1], resident())
        elif request[0] == "generate":
            _, model_dir, prompts, settings = request
            engine = engines.holding(model_dir, resident())
            distributed.gather_object(engine.generate_part(prompts, settings, engines.part))
        else:
            raise RuntimeError(f"unknown request {request[0]!r} from rank 0")


class LeaderEngine:
    """What rank 0's stage functions get as their engine: the rank's own engine, holding
    `model_dir`, with every request made on all ranks at once."""

    def __init__(self, engines: Any, model_dir: Path, resident: Any) -> None:
        self._engines, self._model_dir, self._resident = engines, Path(model_dir), resident

    def _hold(self) -> Any:
        distributed.broadcast_object(("hold", self._model_dir))
        return self._engines.holding(self._model_dir, self._resident)

    def __getattr__(self, name: str) -> Any:  # tokenizer, name, ...
        return getattr(self._hold(), name)

    def generate(self, prompt_token_ids: list[list[int]], settings: Any,
                 on_progress: Any = None) -> list:
        from dcpo_cli.engines.base import merge_parts

        distributed.broadcast_object(("generate", self._model_dir, prompt_token_ids, settings))
        engine = self._engines.holding(self._model_dir, self._resident)
        mine = engine.generate_part(prompt_token_ids, settings, self._engines.part,
                                    on_progress)
        return merge_parts(distributed.gather_object(mine))


def check_world(world_size: int, tensor_parallel_size: int, batch_size: int, n: int,
                mini_batch_size: int | None) -> None:
    """What a world of `world_size` ranks needs of the run's settings (before anything is
    loaded or written)."""
    if world_size % tensor_parallel_size:
        raise DcpoError(f"--tensor-parallel-size {tensor_parallel_size} does not divide the "
                        f"{world_size} processes (one engine per group of that many ranks)")
    groups = world_size // tensor_parallel_size
    if batch_size % groups:
        raise DcpoError(f"--batch-size {batch_size} does not split across {groups} engine "
                        f"groups ({world_size} processes / --tensor-parallel-size "
                        f"{tensor_parallel_size}): use a multiple of {groups}")
    responses = (mini_batch_size or max(1, batch_size // 4)) * n
    if responses < world_size:
        raise DcpoError(f"a mini-batch of {responses} responses cannot be split across "
                        f"{world_size} processes (each needs at least one): use fewer "
                        "processes or a larger train.mini_batch_size")
