"""A tiny Llama with random weights and a tokenizer trained here: a real vLLM model in seconds.

Offline and deterministic (fixed seeds). Its answers are noise, but noise that vLLM tokenizes,
batches, streams, stops and aborts exactly as it would a real model's. The end-of-sequence
token's output row is zero while every other row is random, so greedy decoding never picks it:
answers run to max_tokens unless a test stops them.
"""

from __future__ import annotations

import json
from pathlib import Path

from workers.models import CHATML_TEMPLATE
from workers.synthetic import WORDS

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CONTEXT = 512  # tokens; a test sends a longer prompt to get context_length_exceeded


def _corpus() -> list[str]:
    words = list(WORDS)
    lines = []
    for i in range(400):
        start = (i * 7) % len(words)
        lines.append(" ".join(words[start : start + 12]) + ".")
    lines.append("What is the capital of France? The capital of France is Paris.")
    return lines


def build_tiny_model(folder: Path) -> Path:
    """Write the model folder (config, safetensors, tokenizer, ChatML template) into ``folder``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(folder)
    eos = bpe.token_to_id("<|im_end|>")

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=bpe.get_vocab_size(),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=CONTEXT,
        tie_word_embeddings=False,
        bos_token_id=bpe.token_to_id("<|im_start|>"),
        eos_token_id=eos,
        pad_token_id=eos,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.5)
        model.lm_head.weight[eos].zero_()
    model.generation_config.eos_token_id = eos
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "tokenbus-tiny.json").write_text(json.dumps({"context": CONTEXT}))
    return folder
