"""Engine settings of `dcpo rollout` / `dcpo eval`: parsing, checks, and what each engine is
given (the vLLM engine against the stand-in module of test_vllm_engine.py; the real engine is
in test_vllm_real.py)."""

from __future__ import annotations

import re

import pytest
from conftest import assert_one_line_error, run_dcpo
from fakes import FakeLLM

from dcpo_cli.engines import load_engine
from dcpo_cli.engines import settings as es
from dcpo_cli.engines.settings import EngineSettings, parse_engine_args
from dcpo_cli.errors import DcpoError


def test_engine_args_parse_as_json_or_text():
    assert parse_engine_args(["max_num_seqs=64", "enable-prefix-caching=false",
                              "swap_space=0.5", "compilation_config={\"mode\": 0}",
                              "kv_cache_dtype=fp8", "max_num_seqs=32"]) == (
        ("max_num_seqs", 32), ("enable_prefix_caching", False), ("swap_space", 0.5),
        ("compilation_config", {"mode": 0}), ("kv_cache_dtype", "fp8"))


@pytest.mark.parametrize(("item", "fragment"), [
    ("max_num_seqs", "expected KEY=VALUE"),
    ("=3", "expected KEY=VALUE"),
    ("tensor-parallel-size=2", "use --tensor-parallel-size"),
    ("dtype=half", "use --dtype"),
    ("model=x", "set by dcpo itself"),
    ("logprobs_mode=raw_logprobs", "set by dcpo itself"),
    ("worker_extension_cls=my.Ext", "set by dcpo itself"),
])
def test_bad_engine_args(item, fragment):
    with pytest.raises(DcpoError, match=fragment):
        parse_engine_args([item])


@pytest.mark.parametrize(("settings", "fragment"), [
    (EngineSettings(tensor_parallel_size=0), "--tensor-parallel-size"),
    (EngineSettings(gpu_memory_utilization=1.5), "--gpu-memory-utilization"),
    (EngineSettings(max_model_len=0), "--max-model-len"),
    (EngineSettings(dtype="fp8"), "--dtype must be auto, bfloat16, float16 or float32, "
                                  "not 'fp8'"),
])
def test_bad_settings(settings, fragment):
    with pytest.raises(DcpoError, match=re.escape(fragment)):
        settings.check()


def test_hf_takes_dtype_and_refuses_vllm_settings():
    assert EngineSettings().options_for("hf") == {"dtype": None}
    assert EngineSettings(dtype="bfloat16").options_for("hf") == {"dtype": "bfloat16"}
    for settings, flag in [(EngineSettings(tensor_parallel_size=2), "--tensor-parallel-size"),
                           (EngineSettings(enforce_eager=True), "--enforce-eager"),
                           (EngineSettings(engine_args=(("max_num_seqs", 8),)),
                            "--engine-arg")]:
        with pytest.raises(DcpoError, match=f"{flag} is a vLLM setting"):
            settings.options_for("hf")


def test_tensor_parallel_larger_than_the_devices(monkeypatch):
    monkeypatch.setattr(es, "visible_devices", lambda: (4, "GPU"))
    es.check_tensor_parallel(4)
    with pytest.raises(DcpoError, match="--tensor-parallel-size 8: only 4 GPUs visible"):
        es.check_tensor_parallel(8)


def test_vllm_is_given_every_setting(fake_vllm, random_model_dir, monkeypatch):
    monkeypatch.setattr(es, "visible_devices", lambda: (4, "GPU"))
    monkeypatch.setattr("dcpo_cli.engines.vllm.check_engine_args", lambda args: None)
    settings = EngineSettings(tensor_parallel_size=4, gpu_memory_utilization=0.7,
                              max_model_len=4096, dtype="bfloat16", enforce_eager=True,
                              engine_args=(("max_num_seqs", 64), ("seed", 3)))
    load_engine("vllm", random_model_dir, **settings.options_for("vllm"))
    assert FakeLLM.last.kwargs == {
        "logprobs_mode": "processed_logprobs", "tensor_parallel_size": 4,
        "gpu_memory_utilization": 0.7, "max_model_len": 4096, "dtype": "bfloat16",
        "enforce_eager": True, "use_tqdm_on_load": False, "max_num_seqs": 64, "seed": 3,
        "worker_extension_cls": "dcpo_cli.engines.vllm_worker.WeightUpdates"}
    assert settings.record()["engine_args"] == {"max_num_seqs": 64, "seed": 3}


@pytest.mark.parametrize(("extra", "fragments"), [
    (["--engine", "hf", "--tensor-parallel-size", "2"], ["--tensor-parallel-size is a vLLM"]),
    (["--engine-arg", "max_num_seqs"], ["--engine-arg 'max_num_seqs'", "KEY=VALUE"]),
    (["--dtype", "fp8"], ["--dtype must be auto, bfloat16, float16 or float32, not 'fp8'"]),
])
def test_bad_engine_flags_give_one_line_errors(random_model_dir, tmp_path, extra, fragments):
    result = run_dcpo("rollout", "--model", random_model_dir, "--prompts",
                      tmp_path / "p.parquet", "--step", 0, "--out", tmp_path / "r.parquet",
                      *extra)
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "r.parquet").exists()
