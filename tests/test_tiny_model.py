"""The tiny model directory loads like a Hub model and its tokenizer is character-level."""

from __future__ import annotations


def test_round_trip_and_generation(random_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(random_model_dir)
    model = AutoModelForCausalLM.from_pretrained(random_model_dir)
    text = "12 + 7 = ?\nSay \\boxed{19} é"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode())  # one token per byte
    assert tokenizer.decode(ids) == text
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "1+1"}],
                                           tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\n1+1<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id != tokenizer.eos_token_id
    batch = tokenizer([prompt], return_tensors="pt", add_special_tokens=False)
    torch.manual_seed(0)
    out = model.generate(**batch, do_sample=True, max_new_tokens=5,
                         pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > batch["input_ids"].shape[1]
