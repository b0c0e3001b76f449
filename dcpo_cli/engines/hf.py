"""The transformers back end: `model.generate` with left padding and token-budget batches.

Log-probs come from a logits processor placed after our own temperature / top-k / top-p
warpers, so they are those of the distribution each token was actually sampled from.
"""

from __future__ import annotations

from pathlib import Path

from dcpo_cli.core.batching import pack_greedy
from dcpo_cli.engines.base import (
    Completion,
    Part,
    ProgressCallback,
    SamplingSettings,
    StopCheck,
    Stopped,
    batch_seed,
    eos_token_ids,
    finish,
    share,
)
from dcpo_cli.errors import DcpoError, first_line
from dcpo_cli.files import lora_adapter


def token_budget_batches(lengths: list[int], max_new_tokens: int, budget: int) -> list[list[int]]:
    """Split row indices, in order, into batches whose padded size (rows x (longest prompt +
    max_new_tokens)) stays within `budget` tokens; a row that alone exceeds it runs alone."""
    return pack_greedy(list(range(len(lengths))), lengths, budget, extra=max_new_tokens)


class _Recorder:
    """Logits processor run last: keeps log-softmax of the final scores of each step and,
    one step later, picks out the log-prob of the token that was sampled from them."""

    def __init__(self) -> None:
        self.previous = None
        self.logprobs: list = []

    def __call__(self, input_ids, scores):
        import torch

        if self.previous is not None:
            self.logprobs.append(self.previous.gather(1, input_ids[:, -1:]).squeeze(1))
        self.previous = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def finish(self, last_tokens):
        self.logprobs.append(self.previous.gather(1, last_tokens[:, None]).squeeze(1))
        import torch

        return torch.stack(self.logprobs, dim=1)


class _Asked:
    """Stopping criterion: ends every row at the next decoding step once `should_stop()`."""

    def __init__(self, should_stop: StopCheck) -> None:
        self.should_stop = should_stop

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        stop = self.should_stop()
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool,
                          device=input_ids.device)


class HFEngine:
    name = "hf"

    def __init__(self, model_path: str | Path, device: str | None = None,
                 dtype: str | None = None, token_budget: int | None = None) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # our own progress bar is the one on screen

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        torch_dtype = getattr(torch, dtype) if dtype else (
            torch.bfloat16 if self.device == "cuda" else torch.float32)
        # A LoRA checkpoint: its base model, then the adapter on top (`use_adapter`)
        adapter = Path(model_path) if lora_adapter.is_adapter(model_path) else None
        self.base_path = lora_adapter.base_source(adapter).path if adapter else Path(model_path)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.base_path)
            self.model = AutoModelForCausalLM.from_pretrained(self.base_path, dtype=torch_dtype)
        except (OSError, ValueError) as exc:
            reason = first_line(exc)
            raise DcpoError(f"{self.base_path}: cannot load the model ({reason})") from None
        self.model.to(self.device).eval()
        self.adapter: Path | None = None
        self.eos_ids = eos_token_ids(self.tokenizer, self.model.generation_config)
        # transformers merges the model's own generation_config.json (a Hub model's sampling
        # defaults: temperature, top-k, repetition penalty, ...) into every generate call;
        # a bare one keeps sampling exactly as the user asked.
        self.model.generation_config = GenerationConfig()
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else min(self.eos_ids)
        self.token_budget = token_budget or (262_144 if self.device == "cuda" else 16_384)
        if adapter is not None:  # after the generation config is set on the base model
            self.use_adapter(adapter)

    def generate(self, prompt_token_ids: list[list[int]], settings: SamplingSettings,
                 on_progress: ProgressCallback | None = None,
                 should_stop: StopCheck | None = None) -> list[list[Completion]]:
        return self.generate_part(prompt_token_ids, settings, (0, 1), on_progress,
                                  should_stop)

    def generate_part(self, prompt_token_ids: list[list[int]], settings: SamplingSettings,
                      part: Part, on_progress: ProgressCallback | None = None,
                      should_stop: StopCheck | None = None) -> list[list[Completion | None]]:
        """Share `part` of `generate` (base.py): the token-budget batches of the whole list,
        dealt out in contiguous runs; each batch is generated as in one process, with its
        own seed, so the tokens are the same whichever rank draws it."""
        rows = [(p, s) for p in range(len(prompt_token_ids)) for s in range(settings.n)]
        lengths = [len(prompt_token_ids[p]) for p, _ in rows]
        batches = token_budget_batches(lengths, settings.max_new_tokens, self.token_budget)
        done: dict[tuple[int, int], Completion] = {}
        tokens = 0
        for b in share(len(batches), part):
            batch_rows = [rows[i] for i in batches[b]]
            prompts = [prompt_token_ids[p] for p, _ in batch_rows]
            seed = batch_seed(settings.seed, batch_rows)
            generated = self._generate_batch(prompts, settings, seed, should_stop)
            if should_stop is not None and should_stop():  # (the batch may have been cut)
                raise Stopped()
            for row, completion in zip(batch_rows, generated, strict=True):
                done[row] = completion
                tokens += len(completion.token_ids)
            if on_progress:
                on_progress(len(done), tokens)
        return [[done.get((p, s)) for s in range(settings.n)]
                for p in range(len(prompt_token_ids))]

    def _generate_batch(self, prompts: list[list[int]], settings: SamplingSettings,
                        seed: int, should_stop: StopCheck | None = None) -> list[Completion]:
        import torch
        from transformers import (
            GenerationConfig,
            LogitsProcessorList,
            StoppingCriteriaList,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        width = max(len(p) for p in prompts)
        input_ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts])
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        # Our warpers, in transformers' own order, then the recorder; the generation config
        # turns every built-in processor off so nothing runs after the recorder (a field left
        # None would take transformers' default, such as top_k=50).
        processors = []
        if not settings.greedy:
            if settings.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(settings.temperature))
            if settings.top_k > 0:
                processors.append(TopKLogitsWarper(settings.top_k))
            if settings.top_p < 1.0:
                processors.append(TopPLogitsWarper(settings.top_p))
        recorder = _Recorder()
        config = GenerationConfig(
            max_new_tokens=settings.max_new_tokens, do_sample=not settings.greedy,
            temperature=1.0, top_k=0, top_p=1.0, eos_token_id=sorted(self.eos_ids),
            pad_token_id=self.pad_id, bos_token_id=None,
        )
        torch.manual_seed(seed)
        with torch.inference_mode():
            sequences = self.model.generate(
                input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device),
                generation_config=config,
                logits_processor=LogitsProcessorList([*processors, recorder]),
                stopping_criteria=StoppingCriteriaList([_Asked(should_stop)] if should_stop
                                                       else []),
            )
        generated = sequences[:, width:]
        logprobs = recorder.finish(generated[:, -1]).cpu().tolist()
        return [finish(ids, lps, self.eos_ids, settings.max_new_tokens, self.tokenizer)
                for ids, lps in zip(generated.cpu().tolist(), logprobs, strict=True)]

    def use_adapter(self, directory: Path) -> None:
        """Generate with the LoRA adapter of checkpoint `directory` (whose base this engine
        holds), unmerged as the trainer computes it: base + alpha / r * B A, in fp32 on a CPU,
        so the rollouts' log-probs are the trainer's up to summation order. A later adapter
        of the same shape replaces the weights in place (`dcpo run`, once per step)."""
        import torch

        from dcpo_cli.extras import require

        require("lora", f"{directory}: a LoRA checkpoint (the hf engine applies it with peft)")
        from peft import PeftModel
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        directory = Path(directory)
        same_shape = self.adapter is not None and (
            lora_adapter.checkpoint_settings(directory)
            == lora_adapter.checkpoint_settings(self.adapter))
        if same_shape:
            weights = load_file(directory / lora_adapter.ADAPTER_WEIGHTS)
            with torch.no_grad():
                set_peft_model_state_dict(self.model, weights)
        else:
            if self.adapter is not None:  # another rank or modules: back to the bare base
                self.model = self.model.unload()
            try:
                self.model = PeftModel.from_pretrained(self.model, str(directory))
            except (OSError, ValueError, KeyError, RuntimeError) as exc:
                raise DcpoError(f"{directory}: cannot load the LoRA adapter "
                                f"({first_line(exc)})") from None
            self.model.to(self.device).eval()
        self.adapter = directory

    def weight_layout(self):
        """The names, shapes and kinds `load_weights` takes (engines/weights.py)."""
        from dcpo_cli.engines.weights import module_layout

        return module_layout(self.model)

    def load_weights(self, named_tensors) -> None:
        """Replace the weights in memory (`dcpo run` after each train-step, `dcpo serve`'s
        load-weights): the same values, cast to this engine's dtype, as loading the
        checkpoint those tensors were saved to. Every weight must come, but for a tied copy
        (the lm-head of tied embeddings) that a saved checkpoint leaves out.

        A mapping (all the weights at hand) is checked whole before anything is copied, so a
        refused load changes nothing. Any other iterable is copied one tensor at a time as
        it yields them (under torchrun each is gathered from the FSDP2 shards just before),
        so no second copy of the model is held; each tensor's name and shape is checked
        before it is copied, the missing ones only at the end."""
        from collections.abc import Mapping

        import torch

        from dcpo_cli.engines.weights import check_weights

        layout = self.weight_layout()
        if isinstance(named_tensors, Mapping):
            check_weights(named_tensors, layout)
            named_tensors = named_tensors.items()
        mine = self.model.state_dict()
        seen = set()
        with torch.no_grad():
            for name, tensor in named_tensors:
                check_weights({name: tensor}, layout, complete=False)
                mine[name].copy_(tensor)
                seen.add(name)
        missing = layout.required(seen)
        if missing:
            raise DcpoError(f"the new weights do not fit the model: {len(missing)} missing "
                            f"tensors ({missing[0]}, ...)")
