"""TensorBoard: event files in the run directory."""

from __future__ import annotations

import json

from dcpo_cli.trackers.base import Backend, digest


class TensorBoard(Backend):
    """Event files in HOME/tensorboard (one more file per process, as every writer does),
    through torch's SummaryWriter. Scalars are written as float64 tensors (TensorBoard's
    new-style scalars), so what is read back equals metrics.jsonl exactly."""

    name = "tensorboard"

    def start(self, home, run_name, kept, config):
        from torch.utils.tensorboard import SummaryWriter

        logdir = kept.get("logdir") or str(home / "tensorboard")
        self.writer = SummaryWriter(logdir)
        shown = dict(kept.get("config", {}))
        for section, settings in config.items():  # the settings as text, once per change
            settings_digest = digest(settings)
            if shown.get(section) != settings_digest:
                text = json.dumps(settings, indent=2, sort_keys=True, default=str)
                self.writer.add_text(f"config/{section}", f"```\n{text}\n```", 0)
                shown[section] = settings_digest
        return {"logdir": logdir, "config": shown}

    def log(self, values, step):
        for key, value in values.items():
            self.writer.add_scalar(key, value, step, new_style=True, double_precision=True)
        self.writer.flush()

    def finish(self):
        self.writer.close()
