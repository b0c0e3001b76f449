"""The built-in tiny policy: a real Qwen2 architecture with a character-level tokenizer.

It loads through `AutoTokenizer` / `AutoModelForCausalLM.from_pretrained` (and vLLM) like
any Hub model, so every stage runs on it for real without a download.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PAD, BOS, EOS, IM_START, UNK = "<|endoftext|>", "<|bos|>", "<|im_end|>", "<|im_start|>", "<|unk|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, IM_START, UNK]


def byte_alphabet() -> list[str]:
    """The 256 byte-level symbols (GPT-2's bytes_to_unicode), ordered by byte value.

    One token per byte means any text round-trips, and the pipeline is the byte-level one
    that transformers' Qwen2Tokenizer rebuilds on load, so both load paths agree.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    shifted, symbols = 0, []
    for byte in range(256):
        if byte in printable:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(256 + shifted))
            shifted += 1
    return symbols

# ChatML, as Qwen models use; the assistant turn ends with <|im_end|>, the eos token.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TinySize:
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 384
    max_positions: int = 512


# About 0.8 M parameters: small enough that `dcpo tiny init` can warm it up for ~700 SFT
# steps within its 3-minute budget on 2 CPU cores (a 1.6 M model learned less in that time).
DEFAULT_SIZE = TinySize()
# Heads of 32 dimensions: vLLM's CPU attention has kernels for head sizes 32, 64, 80, ...
# only, and the test model must run on the real engine too (make test-vllm).
TEST_SIZE = TinySize(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                     intermediate_size=96, max_positions=512)


def build_tokenizer():
    """A character-level `PreTrainedTokenizerFast` with pad/bos/eos tokens and a chat template.

    Byte-level BPE without merges: every byte (so every ASCII character) is one token.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + byte_alphabet())}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.normalizer = normalizers.NFC()
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK,
        padding_side="left", clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(tokenizer, size: TinySize = DEFAULT_SIZE, seed: int = 0):
    """A randomly initialised Qwen2 causal LM sized for a CPU."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden_size,
        num_hidden_layers=size.num_layers,
        num_attention_heads=size.num_heads,
        num_key_value_heads=size.num_kv_heads,
        intermediate_size=size.intermediate_size,
        max_position_embeddings=size.max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config)


def save_model_dir(model, tokenizer, directory: str | Path) -> Path:
    """Save weights (safetensors), config, generation config and tokenizer into `directory`."""
    directory = Path(directory)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def build_random_model_dir(directory: str | Path, size: TinySize = TEST_SIZE,
                           seed: int = 0) -> Path:
    """An untrained tiny model directory: the fastest real model for tests."""
    tokenizer = build_tokenizer()
    return save_model_dir(build_model(tokenizer, size, seed), tokenizer, directory)
