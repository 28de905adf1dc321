"""The reward model's training data: preference pairs as reward-model token ids, and their batches.

Two layouts: `build_dataset` gives one row per pair (`chosen_ids`, `rejected_ids` [, `margin`]) for
TRL's RewardTrainer and its collator; `build_grouped_dataset` gives one row per prompt (its distinct
responses once each, its pairs as indices into them) for `collate_groups`, so each response is scored
once per step. Both encode through `reward_models.model.encode_pairs`, the format the model is scored in.
"""

from __future__ import annotations

from typing import Any

import torch

from reward_models.model import encode_pairs, right_pad
from rlhf.utils import UserError


def index_responses(pairs: list[dict[str, Any]]) -> tuple[list, list[str], list[int], list[int]]:
    """The distinct (prompt, response) texts of `pairs`, in first-seen order, and each pair's chosen and
    rejected response as an index into them: every text is then scored once, however many pairs it is in."""
    index: dict[tuple[str, str], int] = {}
    prompts, texts, chosen, rejected = [], [], [], []
    for p in pairs:
        for text, side in ((p["chosen"], chosen), (p["rejected"], rejected)):
            key = (repr(p["prompt"]), text)
            if key not in index:
                index[key] = len(texts)
                prompts.append(p["prompt"])
                texts.append(text)
            side.append(index[key])
    return prompts, texts, chosen, rejected


def build_dataset(tokenizer, pairs: list[dict[str, Any]], max_length: int, use_margin: bool):
    """Pre-tokenised pairs (chosen_ids / rejected_ids [/ margin]) in the exact format used for scoring."""
    import datasets  # ~1 s to import: only reward training builds a Dataset

    prompts = [p["prompt"] for p in pairs]
    data = {"chosen_ids": encode_pairs(tokenizer, prompts, [p["chosen"] for p in pairs], max_length),
            "rejected_ids": encode_pairs(tokenizer, prompts, [p["rejected"] for p in pairs], max_length)}
    if use_margin:
        data["margin"] = pair_margins(pairs)
    return datasets.Dataset.from_dict(data)


def pair_margins(pairs: list[dict[str, Any]]) -> list[float]:
    if any("margin" not in p for p in pairs):
        raise UserError("reward.use_margin is set but some preference pairs have no margin")
    return [float(p["margin"]) for p in pairs]


def build_grouped_dataset(tokenizer, pairs: list[dict[str, Any]], max_length: int, use_margin: bool):
    """One row per prompt: its distinct responses as RM token ids (`ids`), and its labelled pairs as
    indices into them (`chosen`, `rejected` [, `margin`])."""
    import datasets  # ~1 s to import: only reward training builds a Dataset

    margins = pair_margins(pairs) if use_margin else [0.0] * len(pairs)
    prompts, texts, c_idx, r_idx = index_responses(pairs)
    ids = encode_pairs(tokenizer, prompts, texts, max_length)
    groups: dict[str, dict[str, list]] = {}
    local: dict[int, int] = {}  # text index -> position within its prompt's group
    for pair, c, r, margin in zip(pairs, c_idx, r_idx, margins):
        g = groups.setdefault(repr(pair["prompt"]), {"ids": [], "chosen": [], "rejected": [], "margin": []})
        for i in (c, r):
            if i not in local:
                local[i] = len(g["ids"])
                g["ids"].append(ids[i])
        g["chosen"].append(local[c])
        g["rejected"].append(local[r])
        g["margin"].append(margin)
    rows = list(groups.values())
    columns = ["ids", "chosen", "rejected"] + (["margin"] if use_margin else [])
    return datasets.Dataset.from_dict({k: [row[k] for row in rows] for k in columns})


def collate_groups(pad_token_id: int):
    """Batches of prompt groups: all their responses right-padded into one batch, and the pairs as
    global indices into it."""
    def collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        seqs, chosen, rejected, margin = [], [], [], []
        for row in rows:
            offset = len(seqs)
            seqs.extend(row["ids"])
            chosen.extend(offset + i for i in row["chosen"])
            rejected.extend(offset + i for i in row["rejected"])
            margin.extend(row.get("margin", []))
        input_ids, attention_mask = right_pad(seqs, pad_token_id)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask,
                 "chosen_index": torch.tensor(chosen), "rejected_index": torch.tensor(rejected)}
        if margin:
            batch["margin"] = torch.tensor(margin, dtype=torch.float)
        return batch

    return collate
