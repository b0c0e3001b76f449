"""Weights & Biases: one W&B run continued by every process."""

from __future__ import annotations

import os

from dcpo_cli.trackers.base import Backend, new_id


class Wandb(Backend):
    """One W&B run continued by every process (`resume="allow"` with the kept id). The x
    axis is the `global_step` value logged with every row (wandb's define_metric), so an
    evaluation of an earlier checkpoint still lands at its step. Project and entity from
    WANDB_PROJECT (default "dcpo") and WANDB_ENTITY; WANDB_MODE=offline writes HOME/wandb
    for `wandb sync`. Without WANDB_INIT_TIMEOUT, a server that does not answer is given up
    after 30 s (wandb's own default is 90)."""

    name = "wandb"

    def start(self, home, run_name, kept, config):
        import wandb

        run_id = kept.get("run_id") or new_id()
        home.mkdir(parents=True, exist_ok=True)
        settings = {"console": "off", "silent": True}
        if "WANDB_INIT_TIMEOUT" not in os.environ:
            settings["init_timeout"] = 30.0
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "dcpo"), id=run_id,
                              name=run_name, resume="allow", config=config,
                              dir=None if os.environ.get("WANDB_DIR") else str(home),
                              settings=wandb.Settings(**settings))
        self.run.config.update(config, allow_val_change=True)
        self.run.define_metric("global_step")
        self.run.define_metric("*", step_metric="global_step")
        return {"run_id": run_id}

    def log(self, values, step):
        self.run.log({**values, "global_step": step})

    def finish(self):
        self.run.finish()
