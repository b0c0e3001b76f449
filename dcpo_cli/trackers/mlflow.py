"""MLflow: an MLflow run continued by its kept run id."""

from __future__ import annotations

from dcpo_cli.trackers.base import Backend, digest


class Mlflow(Backend):
    """An MLflow run continued by its kept run id (MLFLOW_TRACKING_URI,
    MLFLOW_EXPERIMENT_NAME as MLflow reads them). MLflow refuses '@' in a metric name:
    `avg@8` is logged as `avg_at_8`. The settings are its params, `section.field`."""

    name = "mlflow"

    def start(self, home, run_name, kept, config):
        import mlflow

        self.mlflow = mlflow
        run = mlflow.start_run(run_id=kept.get("run_id"),
                               run_name=None if kept.get("run_id") else run_name)
        logged = dict(kept.get("config", {}))
        for section, settings in config.items():
            if section not in logged:  # MLflow params cannot change once logged
                mlflow.log_params({f"{section}.{k}": str(v)[:6000]
                                   for k, v in settings.items()})
                logged[section] = digest(settings)
        return {"run_id": run.info.run_id, "config": logged}

    def log(self, values, step):
        self.mlflow.log_metrics({k.replace("@", "_at_"): float(v) for k, v in values.items()},
                                step=step)

    def finish(self):
        self.mlflow.end_run()
