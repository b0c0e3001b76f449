"""Experiment trackers (`--report-to`): the metrics of metrics.jsonl and the eval summaries,
sent to TensorBoard, Weights & Biases, Trackio or MLflow through their own libraries.

A tracker is a mirror, never the record: metrics.jsonl, metrics.json and summary.json are
written first, and a tracker that fails (not installed, not logged in, network down, raising
while logging) costs one warning line on stderr and is left alone for the rest of the
process; the step goes on and exits 0.

The shell loop runs each train-step as its own process, so the tracker run has to outlive
them: `HOME/trackers.json` (HOME: the folder of the SAS state file, i.e. the run directory)
keeps each backend's run id, and the steps already logged to it, so a resumed or re-run step
is never logged twice and the next process continues the same tracker run. Backends are
opened on the first value to log, so a step with nothing new opens no tracker run at all.

Steps: a train step is logged at its `global_step` (train steps done, the number of the
checkpoint it writes: rollout step N of the loop is global step N + 1), an evaluation at the
global step of the checkpoint it measured (0 for a model that is not a train-step
checkpoint), so `eval/step-000024` lands beside the train step that wrote ckpt/step-000024.

One module per backend (tensorboard, wandb, trackio, mlflow), each a `base.Backend`;
`session.Trackers` is what the stages hold.
"""
