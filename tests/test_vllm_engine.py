"""The vLLM engine against a stand-in `vllm` module (vLLM is not installed on CI machines):
what it asks vLLM for, and how it turns vLLM's outputs into completions."""

from __future__ import annotations

import sys

import pytest
from fakes import FakeLLM

from dcpo_cli.engines import SamplingSettings, load_engine
from dcpo_cli.errors import DcpoError


def test_vllm_engine_requests_and_completions(fake_vllm, random_model_dir):
    engine = load_engine("vllm", random_model_dir)
    llm = FakeLLM.last
    # the sampled distribution's log-probs; quiet loading; vLLM's own defaults otherwise
    assert llm.kwargs == {"logprobs_mode": "processed_logprobs", "tensor_parallel_size": 1,
                          "dtype": "auto", "enforce_eager": False, "use_tqdm_on_load": False,
                          "worker_extension_cls": "dcpo_cli.engines.vllm_worker.WeightUpdates"}
    prompts = [[10, 11, 12], [10, 11, 12], [20, 21, 22, 23, 24, 25]]
    settings = SamplingSettings(n=2, temperature=0.8, top_p=0.9, top_k=0, max_new_tokens=4,
                                seed=7)
    groups = engine.generate(prompts, settings)

    (_, params), = llm.calls
    assert all(p.n == 2 and p.logprobs == 0 and p.top_k == -1 and p.max_tokens == 4
               and p.temperature == 0.8 and p.top_p == 0.9 for p in params)
    seeds = [p.seed for p in params]
    assert len(set(seeds)) == 3  # a repeated prompt gets its own random stream
    assert seeds == [p.seed for p in (engine.generate(prompts, settings), llm.calls[-1][1])[1]]

    first, _, long = groups
    assert [c.token_ids for c in first] == [[12, 11, 10, 2], [13, 12, 11, 2]]
    assert [c.finish_reason for c in first] == ["stop", "stop"]
    assert first[0].logprobs == [-0.12, -0.11, -0.10, -0.02]
    assert [c.finish_reason for c in long] == ["length", "length"]
    assert long[0].token_ids == [25, 24, 23, 22]
    assert long[0].text == engine.tokenizer.decode([25, 24, 23, 22], skip_special_tokens=True)


@pytest.mark.parametrize("sleep_mode", [True, False])
def test_resident_engine_sleeps_while_training_where_vllm_can(fake_vllm, random_model_dir,
                                                              sleep_mode):
    """`dcpo run`'s engine: sleep mode asked for at start where the platform has it (GPUs);
    `release` frees the KV cache (sleep level 1, weights kept) and the next generation wakes
    it first. Without sleep mode (the CPU build) `release` does nothing."""
    fake_vllm_platforms = sys.modules["vllm.platforms"].current_platform
    fake_vllm_platforms.is_sleep_mode_available = lambda: sleep_mode
    engine = load_engine("vllm", random_model_dir, resident=True)
    llm = FakeLLM.last
    assert llm.kwargs.get("enable_sleep_mode", False) is sleep_mode
    settings = SamplingSettings(n=1, max_new_tokens=2, seed=0)
    engine.generate([[10, 11]], settings)
    engine.release()
    engine.release()  # already asleep: once is enough
    engine.generate([[10, 11]], settings)
    engine.generate([[10, 11]], settings)
    events = [call[0] if isinstance(call[0], str) else "generate" for call in llm.calls]
    assert events == (["generate", "sleep", "wake_up", "generate", "generate"] if sleep_mode
                      else ["generate"] * 3)
    assert ("sleep", 1) in llm.calls or not sleep_mode
    not_resident = load_engine("vllm", random_model_dir)
    assert "enable_sleep_mode" not in FakeLLM.last.kwargs
    not_resident.release()
    assert FakeLLM.last.calls == []


def test_cpu_build_prefills_whole_prompts_unless_told(fake_vllm, random_model_dir, monkeypatch):
    """On vLLM's CPU build chunked prefill is off (a prompt split over steps rewinds its
    seeded generator, which a CPU generator cannot); an explicit --engine-arg wins, and
    GPUs keep vLLM's default."""
    monkeypatch.setattr("dcpo_cli.engines.vllm.check_engine_args", lambda args: None)
    platform = sys.modules["vllm.platforms"].current_platform
    load_engine("vllm", random_model_dir)
    assert "enable_chunked_prefill" not in FakeLLM.last.kwargs
    platform.is_cpu = lambda: True
    load_engine("vllm", random_model_dir)
    assert FakeLLM.last.kwargs["enable_chunked_prefill"] is False
    for value in (True, False):
        load_engine("vllm", random_model_dir, engine_args={"enable_chunked_prefill": value})
        assert FakeLLM.last.kwargs["enable_chunked_prefill"] is value
    load_engine("vllm", random_model_dir, engine_args={"max_num_batched_tokens": 1024})
    assert FakeLLM.last.kwargs["max_num_batched_tokens"] == 1024
    assert FakeLLM.last.kwargs["enable_chunked_prefill"] is False


def test_cpu_build_gets_a_fixed_kv_cache_unless_memory_is_set(fake_vllm, random_model_dir,
                                                               monkeypatch):
    """On vLLM's CPU build dcpo asks for a 1 GiB KV cache instead of vLLM's 92% of the
    machine; --gpu-memory-utilization, an explicit kv_cache_memory_bytes or vLLM's own
    VLLM_CPU_KVCACHE_SPACE win, and GPUs keep vLLM's default."""
    from dcpo_cli.engines.vllm import CPU_KV_CACHE_BYTES

    monkeypatch.setattr("dcpo_cli.engines.vllm.check_engine_args", lambda args: None)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    platform = sys.modules["vllm.platforms"].current_platform
    load_engine("vllm", random_model_dir)
    assert "kv_cache_memory_bytes" not in FakeLLM.last.kwargs
    platform.is_cpu = lambda: True
    load_engine("vllm", random_model_dir)
    assert FakeLLM.last.kwargs["kv_cache_memory_bytes"] == CPU_KV_CACHE_BYTES == 2**30
    load_engine("vllm", random_model_dir, gpu_memory_utilization=0.3)
    assert "kv_cache_memory_bytes" not in FakeLLM.last.kwargs
    load_engine("vllm", random_model_dir, engine_args={"kv_cache_memory_bytes": 1 << 26})
    assert FakeLLM.last.kwargs["kv_cache_memory_bytes"] == 1 << 26
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "2")
    load_engine("vllm", random_model_dir)
    assert "kv_cache_memory_bytes" not in FakeLLM.last.kwargs


def test_an_engine_that_fails_to_start_is_one_line(fake_vllm, random_model_dir, monkeypatch):
    def failing(**kwargs):
        raise RuntimeError("Engine core initialization failed. See root cause above.\nmore")

    monkeypatch.setattr(sys.modules["vllm"], "LLM", lambda model, **kwargs: failing(**kwargs))
    with pytest.raises(DcpoError, match="the vLLM engine failed to start .*Engine core "
                                        "initialization failed.*log above") as caught:
        load_engine("vllm", random_model_dir)
    assert "\n" not in str(caught.value)


def test_a_lora_checkpoint_is_served_as_base_plus_lora_request(fake_vllm, random_model_dir,
                                                                tmp_path):
    """vLLM gets the base model with LoRA on (a slot of vLLM's next rank up), and every
    generate call names the checkpoint's adapter; `use_adapter` (dcpo run, each step) hands
    out a new id, so vLLM loads the new adapter instead of its cached one."""
    from builders import write_scored
    from transformers import AutoTokenizer

    from dcpo_cli.train.step import TrainOptions, run_train_step

    tokenizer = AutoTokenizer.from_pretrained(random_model_dir)
    scored = write_scored(tmp_path / "scored.parquet", tokenizer, 0,
                          {"p0": [1, 0, 0, 1], "p1": [0, 1, 1, 0]})
    options = TrainOptions(lr=1e-2, warmup_steps=0, micro_batch_tokens=256, lora_rank=4)
    run_train_step(random_model_dir, [scored], tmp_path / "state.json", tmp_path / "ckpt",
                   options, show_progress=False)
    engine = load_engine("vllm", tmp_path / "ckpt")
    llm = FakeLLM.last
    assert llm.model == str(random_model_dir)
    assert (llm.kwargs["enable_lora"], llm.kwargs["max_lora_rank"], llm.kwargs["max_loras"]) \
        == (True, 8, 1)
    settings = SamplingSettings(n=1, max_new_tokens=2, seed=0)
    engine.generate([[10, 11]], settings)
    first = llm.lora_requests[-1]
    assert first.lora_path == str((tmp_path / "ckpt").resolve()) and first.lora_int_id == 1
    engine.use_adapter(tmp_path / "ckpt")
    engine.generate([[10, 11]], settings)
    assert llm.lora_requests[-1].lora_int_id == 2
    plain = load_engine("vllm", random_model_dir)  # a base model: no LoRA asked for
    assert "enable_lora" not in FakeLLM.last.kwargs
    plain.generate([[10, 11]], settings)
    assert FakeLLM.last.lora_requests == [None]
    with pytest.raises(DcpoError, match="started without LoRA"):
        plain.use_adapter(tmp_path / "ckpt")
    # dcpo run starts its engine from the base with LoRA on, for the adapters to come
    load_engine("vllm", random_model_dir, lora_rank=16)
    assert FakeLLM.last.kwargs["max_lora_rank"] == 16
