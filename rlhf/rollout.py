"""Rollouts: generate responses for a batch of prompts and score them, without gradients.

`collect_rollout` turns prompts into a `Rollout`, everything the PPO update needs; `forward_tokens` is
the one function that runs models over prompt + response tokens for it (and for the evaluation).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from rlhf.generation import Responses, decode_responses, left_pad, sample, unwrap
from rlhf.ppo_core import logprobs_from_logits
from rlhf.ppo_models import PolicyAndValue, Sequences, attention_implementation, response_forward
from rlhf.utils import TrainingFault


@dataclass
class Rollout:
    """One batch of experience; B rollouts, prompts padded to P, responses to R tokens."""

    prompts: list[Any]  # B prompts as given (strings or chat messages)
    queries: torch.Tensor  # (B, P) left-padded prompt ids
    responses: Responses  # (B, R) sampled ids with their bool mask, stop flags and lengths
    seqs: Sequences  # prompt + response as the models read them
    logprobs: torch.Tensor  # (B, R) log π_old(token) at sampling temperature
    ref_logprobs: torch.Tensor  # (B, R) log π_ref(token)
    values: torch.Tensor | None  # (B, R) V(state before token); None without a value function
    scores: torch.Tensor  # (B,) reward of the whole response (RM / judge, after penalties)
    response_texts: list[str]  # B decoded responses
    gold: torch.Tensor | None = None  # (B,) gold-judge score, for monitoring only
    ref_distribution: torch.Tensor | None = None  # (B, R, V) log π_ref over the vocabulary (ppo.kl_loss_coef)
    rewards: torch.Tensor | None = None  # (B, R) per-token rewards: -β·KL, plus the score at the last token
    kl: torch.Tensor | None = None  # (B, R) per-token KL estimate
    advantages: torch.Tensor | None = None  # (B, R) whitened advantages (GAE, or leave-one-out per answer)
    returns: torch.Tensor | None = None  # (B, R) value targets; None without a value function
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def response_mask(self) -> torch.Tensor:
        return self.responses.mask  # (B, R) bool


@dataclass
class KeptForward:
    """The policy-and-value forward of a whole rollout at the weights that sampled it, with its autograd graph:
    when one micro-batch holds the batch it is the first PPO epoch's forward (`ppo_update(first_forward=)`)."""

    logits: torch.Tensor | None  # (B, R, V); None when the policy's logprobs came from sampling
    values: torch.Tensor | None  # (B, R); None without a value function


def forward_tokens(model: PolicyAndValue | None, seqs: Sequences, responses: torch.Tensor, temperature: float,
                   micro_batch_size: int, *, what: str = "both", lm=None, keep_graph: bool = False,
                   full: bool = False) -> tuple[torch.Tensor | None, torch.Tensor | None, KeptForward | None]:
    """(logprobs (B, R) of `responses`, values (B, R), kept forward): the one place models read a rollout.

    `what` is the forward of the trained `model` (`PolicyAndValue.forward`: "both", "logits", "values",
    "reference"); with `lm`, the logprobs of that plain causal LM instead (a frozen reference, a policy under
    evaluation). Micro-batches of `micro_batch_size` rows, without gradients; `keep_graph` instead runs `model`
    over the whole batch with autograd on and returns that forward too (`KeptForward`). `full`: float32
    log-probabilities over the whole vocabulary (B, R, V) in place of the responses' logprobs (not with
    `keep_graph`)."""
    if keep_graph:
        with torch.enable_grad():
            logits, values = model(*seqs, what=what)
        logprobs = logprobs_from_logits(logits.detach(), responses, temperature) if logits is not None else None
        return logprobs, values.detach() if values is not None else None, KeptForward(logits, values)
    all_logprobs, all_values = [], []
    with torch.no_grad():
        for i in range(0, responses.shape[0], micro_batch_size):
            part, rows = seqs.rows(slice(i, i + micro_batch_size)), responses[i:i + micro_batch_size]
            logits, values = (response_forward(lm, part)[0], None) if lm is not None else model(*part, what=what)
            if logits is not None:
                all_logprobs.append(torch.log_softmax(logits.float() / temperature, dim=-1) if full
                                    else logprobs_from_logits(logits, rows, temperature))
            if values is not None:
                all_values.append(values)
            del logits
    return (torch.cat(all_logprobs) if all_logprobs else None,
            torch.cat(all_values) if all_values else None, None)


def collect_rollout(model: PolicyAndValue, ref_policy, prompts: list[Any], prompt_ids: list[list[int]],
                    tokenizer, score_fn: Callable[[list[Any], list[str]], torch.Tensor],
                    gold_fn: Callable[[list[str]], list[float]] | None, *, max_new_tokens: int, temperature: float,
                    stop_ids: list[int], micro_batch_size: int, missing_eos_penalty: float | None = None,
                    score_clip: float | None = None, sampler=None, min_new_tokens: int = 0,
                    keep_forward: bool = False,
                    keep_ref_distribution: bool = False) -> tuple[Rollout, KeptForward | None]:
    """Sample one batch and compute logprobs, reference logprobs, values and scores (DESIGN details 1-4).

    `sampler` is the model that generates (default: the policy), e.g. a bf16 copy of fp32 weights.
    `keep_forward`: also return the policy-and-value forward with its graph (see `KeptForward`).
    `keep_ref_distribution`: also keep the reference's log-probabilities over the whole vocabulary."""
    net = unwrap(model)  # its parts are read here; its forwards go through `model`, the engine's wrapper
    timings = {}
    device = next(net.parameters()).device
    t0 = time.perf_counter()
    # 1. sample from left-padded prompts, cut after the first stop token
    queries, query_mask = left_pad(prompt_ids, tokenizer.pad_token_id, device)
    generator = sampler or net.policy
    # When the policy samples itself without autocast, generation computes the very logits of the training
    # forward (up to float rounding of the KV cache): its logprobs are kept, and with a separate critic (or no
    # value function) the policy forward of step 2 is skipped.
    reuse = (sampler is None and (net.critic is not None or not net.has_values)
             and not torch.is_autocast_enabled(device.type))
    # the sampler already holds its weights in its dtype; a policy trained with eager attention samples with
    # the attention it was loaded with (faster at generation)
    with torch.autocast(device.type, enabled=False), attention_implementation(generator, net.generation_attention):
        responses = sample(generator, queries, query_mask, max_new_tokens, temperature, stop_ids,
                           tokenizer.pad_token_id, min_new_tokens=min_new_tokens, return_logprobs=reuse)
    timings["generate"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    # 2. policy logprobs and values, reference logprobs: one forward each over prompt + response
    seqs = Sequences.join(queries, query_mask, responses.ids, responses.mask)
    args = (seqs, responses.ids, temperature, micro_batch_size)
    logprobs, values, kept = None, None, None
    if not reuse or net.has_values:
        logprobs, values, kept = forward_tokens(model, *args, what="values" if reuse else "both",
                                                keep_graph=keep_forward)
    if reuse:  # the policy's logprobs come from generation: only the critic's forward (if any) was due
        logprobs = responses.logprobs
    ref_logprobs, _, _ = forward_tokens(model, *args, what="reference", lm=ref_policy, full=keep_ref_distribution)
    ref_distribution = None
    if keep_ref_distribution:  # the vocabulary's log-probabilities, and the sampled tokens' among them
        ref_distribution = ref_logprobs
        ref_logprobs = torch.gather(ref_distribution, -1, responses.ids.unsqueeze(-1)).squeeze(-1)
    timings["forward"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    # 3. score the decoded text (the RM may use another tokenizer), penalise missing stop tokens
    texts = decode_responses(tokenizer, responses)
    scores = score_fn(prompts, texts).to(device).float()  # (B,)
    if missing_eos_penalty is not None:
        scores = torch.where(responses.has_stop, scores, scores - missing_eos_penalty)
    if score_clip is not None:
        scores = scores.clamp(-score_clip, score_clip)
    gold = torch.tensor(gold_fn(texts), device=device) if gold_fn is not None else None
    timings["score"] = time.perf_counter() - t0
    bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
    if bad:
        raise TrainingFault(f"non-finite reward scores for {len(bad)} of {len(texts)} responses (e.g. "
                            f"{scores[bad[0]].item()} for {texts[bad[0]][:60]!r}): a reward model trained to NaN, "
                            f"or a reward function (ppo.reward) that returns NaN or inf?")
    rollout = Rollout(prompts, queries, responses, seqs, logprobs, ref_logprobs, values, scores, texts, gold=gold,
                      ref_distribution=ref_distribution, timings=timings)
    return rollout, kept
