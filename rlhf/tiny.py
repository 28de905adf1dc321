"""Tiny random models with a word-level tokenizer, built locally in seconds (no hub needed).

They back `configs/tiny.yaml` (the alias `tiny-llama`) and the tests: the whole pipeline runs on
them in about a minute, with a toy judge (`keyword:good`) that PPO can learn to satisfy.

    build_tiny_model("runs/tiny-gpt2", arch="gpt2")
"""

from __future__ import annotations

from pathlib import Path

import torch

from rlhf.utils import atomic_dir

WORDS = (
    "the a an and or but so very really quite good bad great fine okay nice awful happy sad day night "
    "food movie book city rain sun work school friend family music game team trip home car train dog cat "
    "is was are were be it this that i you we they he she my your our their to of in on at for with about "
    "write tell describe review story today yesterday tomorrow morning evening weather coffee park street "
    "love hate like enjoy feel think say make go see come get give take . , ! ?"
).split()
SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<bos> ' + m['role'] + ' : ' + m['content'] + ' <eos> ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<bos> assistant : ' }}{% endif %}"
)


def build_tiny_tokenizer(chat_template: bool = True):
    """A word-level fast tokenizer over ~100 English words, with pad/unk/bos/eos and a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + ["user", "assistant", "system", ":"] + WORDS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
                                  bos_token="<bos>", eos_token="<eos>")
    if chat_template:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def build_tiny_model(out_dir: str | Path, arch: str = "llama", seed: int = 0, hidden: int = 64, layers: int = 2,
                     chat_template: bool = True) -> Path:
    """Save a randomly initialised causal LM of `arch` (llama, gpt2, qwen2) and its tokenizer to `out_dir`."""
    from transformers import AutoModelForCausalLM, GenerationConfig, GPT2Config, LlamaConfig, Qwen2Config

    tok = build_tiny_tokenizer(chat_template)
    ids = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id)
    if arch == "llama":
        config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                             tie_word_embeddings=True, **ids)
    elif arch == "qwen2":
        config = Qwen2Config(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                             tie_word_embeddings=True, **ids)
    elif arch == "gpt2":
        config = GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=512, **ids)
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(**{k: v for k, v in ids.items() if k != "vocab_size"})
    out_dir = Path(out_dir)
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a bar for a 1 MB local write is noise (and breaks one-line errors)
    try:
        with atomic_dir(out_dir) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    return out_dir
