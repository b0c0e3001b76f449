"""Stand-ins for the engines: a fake `vllm.LLM` (vLLM is not installed on CI machines;
conftest's `fake_vllm` fixture puts it in a stand-in `vllm` module) and an engine that
returns scripted texts instead of generating."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FakeLogprob:
    logprob: float


@dataclass
class FakeSample:
    token_ids: list[int]
    logprobs: list[dict[int, FakeLogprob]]


@dataclass
class FakeOutput:
    outputs: list[FakeSample]


class FakeLLM:
    """Answers every prompt with its own token ids reversed, then eos (id 2), the i-th
    sample shifted by i; each token's log-prob is -token/100. Keeps its keyword arguments."""

    def __init__(self, model: str, **kwargs):
        from transformers import AutoTokenizer

        self.model, self.kwargs, self.calls, self.lora_requests = model, kwargs, [], []
        self.tokenizer = AutoTokenizer.from_pretrained(self.model)
        FakeLLM.last = self

    def get_tokenizer(self):
        return self.tokenizer

    def sleep(self, level=1):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tags))

    def generate(self, prompts, params, use_tqdm=True, lora_request=None):
        self.calls.append((prompts, params))
        self.lora_requests.append(lora_request)
        outputs = []
        for prompt, param in zip(prompts, params, strict=True):
            samples = []
            for i in range(param.n):
                ids = [t + i for t in reversed(prompt["prompt_token_ids"])][: param.max_tokens]
                ids = (ids + [2])[: param.max_tokens]
                samples.append(FakeSample(ids, [{t: FakeLogprob(-t / 100)} for t in ids]))
            outputs.append(FakeOutput(samples))
        return outputs


class ScriptedEngine:
    """Returns given texts instead of generating: `reply(prompt_text, prompt_index,
    sample_index, greedy) -> str`, where prompt_text is the decoded prompt."""

    def __init__(self, reply):
        from dcpo_cli.tiny.model import build_tokenizer

        self.tokenizer = build_tokenizer()
        self.reply = reply
        self.calls = []

    def generate(self, prompt_token_ids, settings, on_progress=None):
        from dcpo_cli.engines import Completion

        self.calls.append(settings)
        greedy = settings.temperature == 0
        results = []
        for i, prompt_ids in enumerate(prompt_token_ids):
            prompt = self.tokenizer.decode(prompt_ids)
            group = []
            for j in range(settings.n):
                text = self.reply(prompt, i, j, greedy)
                ids = self.tokenizer.encode(text, add_special_tokens=False)
                group.append(Completion(token_ids=ids, logprobs=[0.0] * len(ids), text=text,
                                        finish_reason="stop"))
            results.append(group)
            if on_progress:
                on_progress((i + 1) * settings.n, 0)
        return results
