"""Trackio: a Trackio run, resumed by name."""

from __future__ import annotations

import os

from dcpo_cli.trackers.base import Backend, quiet_stdout


class Trackio(Backend):
    """A Trackio run (its wandb-like API), resumed by name; project from TRACKIO_PROJECT
    (default "dcpo"), its files where TRACKIO_DIR says. Its banners would go to dcpo's
    stdout (the tables): they are dropped."""

    name = "trackio"

    def start(self, home, run_name, kept, config):
        import trackio

        self.trackio = trackio
        name = kept.get("run_name") or run_name
        with quiet_stdout():
            trackio.init(project=os.environ.get("TRACKIO_PROJECT", "dcpo"), name=name,
                         config=config, resume="allow")
        return {"run_name": name}

    def log(self, values, step):
        self.trackio.log(values, step=step)

    def finish(self):
        with quiet_stdout():
            self.trackio.finish()
