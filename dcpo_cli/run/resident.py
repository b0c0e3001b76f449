"""What `dcpo run` keeps loaded between stages: the trained policy (model, optimizer, RNG)
and the generation engine, with the checks that make them stand in for the files.

The resident policy replaces loading a checkpoint only when it is exactly what that
checkpoint holds: it was saved by the same process into that directory, and the directory's
trainer state is still the one it wrote. The RNG is snapshotted right after the save, so
the next train-step starts from the RNG state the shell loop would restore from the
checkpoint, whatever the rollout, scoring and eval in between drew.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dcpo_cli.files.checkpoint import read_trainer_state, restore_rng, rng_snapshot


@dataclass
class ResidentPolicy:
    """A train-step's updated policy, kept in memory, and the checkpoint it equals."""

    policy: Any  # train.step.Policy
    checkpoint: Path  # resolved
    trainer_state: dict[str, Any]  # as read back from the checkpoint
    rng: dict[str, Any]

    @classmethod
    def after_save(cls, policy: Any, checkpoint: Path) -> ResidentPolicy:
        """Call right after run_train_step wrote `checkpoint` from `policy`."""
        from dcpo_cli.parallel import distributed

        checkpoint = Path(checkpoint).resolve()
        # Under torchrun the checkpoint holds rank 0's RNG, which every rank of the next
        # train-step restores: so do the ranks here
        rng = distributed.broadcast_object(rng_snapshot())
        return cls(policy, checkpoint, read_trainer_state(checkpoint) or {}, rng)

    def holds(self, model_dir: Path) -> bool:
        model_dir = Path(model_dir).resolve()
        return model_dir == self.checkpoint and read_trainer_state(model_dir) == \
            self.trainer_state

    def policy_for(self, model_dir: Path, options: Any, data: Any) -> Any:
        """The policy as train-step would load it from `model_dir` (None: not this one)."""
        from dcpo_cli.policy.build import vocab_size
        from dcpo_cli.train.inputs import check_vocab
        from dcpo_cli.train.step import continue_schedule

        if not self.holds(model_dir):
            return None
        check_vocab(data, vocab_size(self.policy.model))
        restore_rng(self.rng)
        return continue_schedule(self.policy, self.trainer_state, options)

