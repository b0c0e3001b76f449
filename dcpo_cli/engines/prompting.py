"""Prompt rendering: chat template when the tokenizer has one, plain text otherwise."""

from __future__ import annotations


def render_prompt(tokenizer, prompt: str | list[dict], chat_template: bool = True) -> str:
    """The exact text the model is conditioned on."""
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    else:
        messages = [{"role": m["role"], "content": m["content"]} for m in prompt]
    if chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=True)
    # No template: the messages' contents, one per paragraph.
    return "\n\n".join(m["content"] for m in messages)


def encode_prompts(tokenizer, prompts: list[str | list[dict]],
                   chat_template: bool = True) -> list[tuple[str, list[int]]]:
    """(rendered text, token ids) for each prompt. The rendered text already holds any
    special tokens the template adds, so it is tokenized without adding more; plain text
    gets the tokenizer's usual special tokens (a base model's bos)."""
    templated = chat_template and bool(getattr(tokenizer, "chat_template", None))
    rendered = [render_prompt(tokenizer, p, chat_template) for p in prompts]
    encoded = tokenizer(rendered, add_special_tokens=not templated)["input_ids"]
    return [(text, list(ids)) for text, ids in zip(rendered, encoded, strict=True)]
