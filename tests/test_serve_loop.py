"""The acceptance test of `dcpo serve`: examples/tiny_loop.sh with SERVER=1 (one server for
the whole loop, every rollout and evaluation through it, each checkpoint loaded in place)
writes the shell loop's files: the same rollouts (rows, and metadata but for the engine
identity), scores, records, metrics, evaluations, final weights and SAS state."""

from __future__ import annotations

import pytest
from loop_runs import STEPS, finish, run_files, shell_loop, with_tiny_of

# What a served loop records differently, by design: the engine the user named for the
# rollouts (options.engine), and the server (generation_server: its URL and the weights'
# fingerprint). Wall-clock fields are dropped by run_files for every pair of runs.


def _without_server(files: dict) -> dict:
    for value in files.values():
        if isinstance(value, dict) and "metadata" in value:
            meta = value["metadata"].get("dcpo", {})
            server = meta.pop("generation_server", "absent")
            if isinstance(server, dict):
                assert set(server) == {"url", "fingerprint", "engine", "dcpo_version"}
                assert server["engine"] == "hf"
            if meta.get("stage") == "rollout":
                assert meta["options"].pop("engine") in ("hf", "server")
    for key in [k for k in files if k.endswith("/rng")]:
        files[key].pop("python")  # the process's own Python RNG at step 0 (test_run)
    return files


@pytest.mark.slow
def test_the_served_shell_loop_writes_the_shell_loops_files(env, shell_reference, tmp_path):
    served_env = {**env, "SERVER": "1"}
    served = with_tiny_of(tmp_path / "served", shell_reference)
    finish(shell_loop(served, STEPS, served_env), served_env)
    assert not (tmp_path / "served" / "server.url").exists()  # the server was stopped
    import pyarrow.parquet as pq

    last = f"{STEPS - 1:06d}"
    rollouts = pq.read_schema(tmp_path / "served" / "steps" / last / "rollouts.parquet")
    assert b"generation_server\": {" in rollouts.metadata[b"dcpo"]
    ours, theirs = (_without_server(run_files(path)) for path in (tmp_path / "served",
                                                                  shell_reference))
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key] == theirs[key], key
    for name in ("state.json", f"ckpt/step-{STEPS:06d}/model.safetensors",
                 f"ckpt/step-{STEPS:06d}/sas_state.json"):
        assert (tmp_path / "served" / name).read_bytes() == (shell_reference /
                                                              name).read_bytes()
