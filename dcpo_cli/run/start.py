"""Starting `dcpo run`: its settings resolved and checked once, the run directory locked,
run.toml written, then the loop, in this process or on torchrun's ranks.

`plan_run` does everything that can refuse (nothing is written before it returns);
`start_run` then locks RUN_DIR, writes run.toml and runs or launches. A `dcpo run` started
on N processes keeps N in run.toml's [launch], the default of every re-run; a re-run given
another world size goes on there (the training state reshards) and says so.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dcpo_cli.console import err
from dcpo_cli.errors import DcpoError
from dcpo_cli.files import run_layout
from dcpo_cli.run.checks import RunSettings, SettingError, check_run, flag_origin
from dcpo_cli.run.config import parse_set, read_config, resolve, write_config


@dataclass(frozen=True)
class Invocation:
    """What this invocation of `dcpo run` was given besides settings."""

    verbose: bool = False
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None


@dataclass(frozen=True)
class RunPlan:
    run_dir: Path
    settings: RunSettings
    rewrite: bool  # run.toml is new or changes (steps, trackers, launch)
    launch: Any  # parallel.launch.Launch, or None: this process runs the loop


def plan_run(run_dir: Path, given: dict[str, Any], set_items: list[str],
             invocation: Invocation) -> RunPlan:
    """The run's checked settings and how it starts. `given`: the run flags given (flag name
    -> value), `set_items`: the --set values."""
    run_dir = Path(run_dir)
    sets = parse_set(set_items)
    stored_path = run_layout.config_file(run_dir)
    stored = read_config(stored_path) if stored_path.is_file() else None
    config, rewrite = resolve(run_dir, given, sets)
    under_torchrun = "RANK" in os.environ
    try:
        settings = check_run(config, run_dir, invocation.verbose,
                             int(os.environ["WORLD_SIZE"]) if under_torchrun else None)
    except SettingError as exc:
        raise exc.worded(flag_origin(given, sets), stored_path if stored else None) from None
    launch = _launch(config["launch"], invocation) if not under_torchrun else None
    if stored is not None and stored["launch"] != config["launch"] and not under_torchrun:
        err.print(f"{run_dir}: made on {_processes(stored['launch'])}, continuing on "
                  f"{_processes(config['launch'])} (the training state reshards)",
                  highlight=False, soft_wrap=True)
    return RunPlan(run_dir, settings, rewrite, launch)


def _processes(launch: dict[str, Any]) -> str:
    count = (launch.get("nproc_per_node") or 1) * (launch.get("nnodes") or 1)
    return f"{count} process{'es' if count != 1 else ''}"


def _launch(launch: dict[str, Any], invocation: Invocation) -> Any:
    """torchrun's launch for this node, or None (one process)."""
    if launch["nproc_per_node"] is None:
        if invocation.node_rank != 0 or invocation.master_addr is not None \
                or invocation.master_port is not None or launch["nnodes"] != 1:
            raise DcpoError("--nnodes, --node-rank, --master-addr and --master-port go with "
                            "--nproc-per-node")
        return None
    from dcpo_cli.parallel.launch import Launch

    result = Launch(launch["nproc_per_node"], launch["nnodes"], invocation.node_rank,
                    invocation.master_addr, invocation.master_port)
    result.check()
    result.check_capacity()
    return result


def start_run(plan: RunPlan, show_progress: bool = True) -> list | int:
    """Lock RUN_DIR, write run.toml, then run the loop here (its timings) or on the launch's
    processes (their exit code)."""
    from dcpo_cli.files.locks import exclusive

    first_rank = os.environ.get("RANK", "0") == "0" and \
        (plan.launch is None or plan.launch.node_rank == 0)
    # a second dcpo run on RUN_DIR is refused at once (rank 0, or the launcher, holds it)
    with exclusive(plan.run_dir):
        if plan.rewrite and first_rank:
            write_config(plan.settings.config, run_layout.config_file(plan.run_dir))
        if plan.launch is not None:
            from dcpo_cli.parallel.launch import current_argv, relaunch
            from dcpo_cli.run.loop import prepare_inputs

            if first_rank:
                prepare_inputs(plan.run_dir, plan.settings.loop, plan.settings.rollout.seed)
            return relaunch(current_argv(), plan.launch)
        from dcpo_cli.run.loop import run_loop

        return run_loop(plan.run_dir, plan.settings, show_progress)
