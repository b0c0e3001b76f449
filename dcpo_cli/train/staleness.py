"""How stale a step's rollouts are: --model's train step minus the step of the policy that
sampled them (the scored metadata's `policy_step`), checked against --max-staleness.

A lagged loop (examples/tiny_loop.sh with LAG=K) trains step s with checkpoint s on
rollouts sampled by checkpoint s - K; a loop that passes the wrong checkpoint by mistake is
refused here, before anything is written, instead of training off-policy in silence.
"""

from __future__ import annotations

from dcpo_cli.errors import DcpoError
from dcpo_cli.files.model_source import ModelSource, policy_step
from dcpo_cli.train.inputs import StepData


def step_staleness(data: StepData, source: ModelSource, max_staleness: int) -> int | None:
    """The staleness of the step, or None when the scored files do not record their sampling
    policy (older files, other tools: accepted, as before this check existed). Raises
    DcpoError naming both models when it is negative or above `max_staleness`."""
    if data.policy_step is None:
        return None
    model_step = policy_step(source.path)
    staleness = model_step - data.policy_step
    sampled = (f"{data.files[0]}: sampled by {data.policy_model or 'a policy'} "
               f"(step {data.policy_step})")
    if staleness < 0:
        raise DcpoError(f"{sampled}, newer than --model {source.spec} (step {model_step}); "
                        "train a step with the policy that sampled it or a later one")
    if staleness > max_staleness:
        raise DcpoError(f"{sampled}, {staleness} step{'s' if staleness > 1 else ''} behind "
                        f"--model {source.spec} (step {model_step}); --max-staleness is "
                        f"{max_staleness}")
    return staleness
