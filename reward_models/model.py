"""Reward-model input format and scoring, shared by reward training, PPO and evaluation.

The reward model reads (prompt, response) as text in its own tokenizer's format — the chat
template when it has one — so its tokenizer may differ from the policy's: the policy's tokens are
decoded and re-encoded here. Training and scoring go through the same `encode_pairs`, so the RM
always sees text laid out the way it was trained on.

The score is read at the last non-padding token by the model's own pooling, then shifted and
scaled by `config.reward_mean` / `config.reward_std`, the normalisation stored with the model.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch

from rlhf.models import load_reward_model, load_tokenizer
from rlhf.prompts import to_messages


def format_for_rm(tokenizer, prompt: Any, response: str) -> str:
    """One (prompt, response) as the reward model's text."""
    if getattr(tokenizer, "chat_template", None):
        messages = to_messages(prompt, None) + [{"role": "assistant", "content": response}]
        return tokenizer.apply_chat_template(messages, tokenize=False)
    prompt = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
    return f"{prompt}\n{response}{tokenizer.eos_token or ''}"


def encode_pairs(tokenizer, prompts: list[Any], responses: list[str], max_length: int) -> list[list[int]]:
    """Token ids for the RM, truncated from the left so the end of the response (where the score is read) stays."""
    texts = [format_for_rm(tokenizer, p, r) for p, r in zip(prompts, responses)]
    templated = bool(getattr(tokenizer, "chat_template", None))
    ids = tokenizer(texts, add_special_tokens=not templated)["input_ids"]
    return [seq[-max_length:] for seq in ids]


def right_pad(seqs: list[list[int]], pad_token_id: int, device: torch.device | str = "cpu"):
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        attention_mask[i, : len(s)] = 1
    return input_ids.to(device), attention_mask.to(device)


def raw_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Unnormalised RM output, (B,), from right-padded inputs (the model pools at the last real token)."""
    return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, 0].float()


def normalization(model) -> tuple[float, float]:
    config = model.config
    return float(getattr(config, "reward_mean", 0.0)), float(getattr(config, "reward_std", 1.0))


@torch.no_grad()
def score_texts(model, tokenizer, prompts: list[Any], responses: list[str], max_length: int = 512,
                batch_size: int = 32, normalize: bool = True) -> torch.Tensor:
    """Normalised reward-model scores (B,) of responses to prompts, on the model's device."""
    device = next(model.parameters()).device
    seqs = encode_pairs(tokenizer, prompts, responses, max_length)
    out = []
    for i in range(0, len(seqs), batch_size):
        ids, mask = right_pad(seqs[i:i + batch_size], tokenizer.pad_token_id, device)
        out.append(raw_scores(model, ids, mask))
    scores = torch.cat(out) if out else torch.zeros(0, device=device)
    if normalize:
        mean, std = normalization(model)
        scores = (scores - mean) / std
    return scores


def load_scorer(model_dir, cfg, device, dtype) -> Callable[[list[Any], list[str]], torch.Tensor]:
    """The trained reward model in `model_dir` as a function (prompts, responses) -> normalised scores (B,),
    frozen, in `dtype` on `device`: the scorer of PPO and of the evaluation alike."""
    model = load_reward_model(str(model_dir), dtype, cfg.model.trust_remote_code).to(device).eval()
    model.requires_grad_(False)
    tokenizer = load_tokenizer(str(model_dir), cfg.model.trust_remote_code, padding_side="right")
    return functools.partial(score_texts, model, tokenizer, max_length=cfg.reward.max_length)
