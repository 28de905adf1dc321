"""Rollouts: generate responses for a batch of prompts and score them, without gradients (but see `keep_graph`).

`PolicyAndValue` holds the trainable models (policy, optional LoRA, and a value head or a separate
critic) behind one `forward`, so that accelerate can prepare them together; `collect_rollout`
turns prompts into a `Rollout` with everything the PPO update needs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from rlhf.generation import decode_responses, left_pad, sample, unwrap
from rlhf.ppo_core import logprobs_from_logits
from rlhf.utils import TrainingFault


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """`cumsum(mask) - 1`: a token's position ignores the left padding before it (DESIGN detail 1)."""
    return (attention_mask.cumsum(1) - 1).clamp(min=0)


def response_states(hidden: torch.Tensor, context_length: int) -> torch.Tensor:
    """Hidden states (B, R, H) before each response token, contiguous: a strided slice fed to a frozen
    `nn.Linear` (LoRA's LM head, a frozen reference) makes `matmul` expand the weight to a batched copy per
    row instead of one matrix product (4x slower forward on the CPU, measured on SmolLM2's tied 49k head)."""
    return hidden[:, context_length - 1: -1].contiguous()


def causal_lm_parts(model) -> tuple[nn.Module, nn.Module]:
    """(trunk, lm_head) of a causal LM, also through a PEFT wrapper (LoRA layers live inside them)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.base_model, base.get_output_embeddings()


class PolicyAndValue(nn.Module):
    """The policy and its value function: a zero-initialised head on the policy trunk, or a critic."""

    def __init__(self, policy: nn.Module, critic: nn.Module | None = None):
        super().__init__()
        self.policy = policy
        self.critic = critic
        # the attention the policy was loaded with: training may switch it (eager on the CPU), sampling
        # from the policy itself switches back to it
        self.generation_attention = policy.config._attn_implementation
        if critic is None:
            hidden = policy.config.get_text_config().hidden_size
            self.value_head = nn.Linear(hidden, 1)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
        else:
            self.value_head = None

    def forward(self, query_responses: torch.Tensor, attention_mask: torch.Tensor, context_length: int,
                with_values: bool = True):
        """Logits (B, R, V) predicting each response token and values (B, R) of the states before them."""
        position_ids = position_ids_from_mask(attention_mask)
        trunk, lm_head = causal_lm_parts(self.policy)
        hidden = trunk(input_ids=query_responses, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False).last_hidden_state  # (B, T, H)
        hidden = response_states(hidden, context_length)  # (B, R, H): the state before each response token
        logits = lm_head(hidden)  # (B, R, V); only response positions reach the LM head
        if not with_values:
            return logits, None
        if self.critic is None:
            values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)  # (B, R)
        else:
            values = self.critic_values(query_responses, attention_mask, context_length)
        return logits, values.float()

    def critic_values(self, query_responses: torch.Tensor, attention_mask: torch.Tensor, context_length: int):
        """Values (B, R) from the separate critic alone."""
        hidden = self.critic.base_model(input_ids=query_responses, attention_mask=attention_mask,
                                        position_ids=position_ids_from_mask(attention_mask),
                                        use_cache=False).last_hidden_state
        return self.critic.score(response_states(hidden, context_length)).squeeze(-1).float()  # (B, R)


@contextlib.contextmanager
def attention_implementation(model, implementation: str | None):
    """Temporarily switch a model's attention implementation (None: leave it)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    previous = base.config._attn_implementation
    if implementation is None or implementation == previous:
        yield
        return
    base.set_attn_implementation(implementation)
    try:
        yield
    finally:
        base.set_attn_implementation(previous)


@contextlib.contextmanager
def reference_mode(model: PolicyAndValue, ref_policy: nn.Module | None):
    """Yield the reference policy: the frozen copy, or the policy with its LoRA adapter disabled."""
    if ref_policy is not None:
        yield ref_policy
    else:
        with model.policy.disable_adapter():
            yield model.policy


@dataclass
class Rollout:
    """One batch of experience; B rollouts, prompts padded to P, responses to R tokens."""

    prompts: list[Any]  # B prompts as given (strings or chat messages)
    queries: torch.Tensor  # (B, P) left-padded prompt ids
    query_mask: torch.Tensor  # (B, P) 1 on prompt tokens
    responses: torch.Tensor  # (B, R) sampled ids, padding after the first stop token
    response_mask: torch.Tensor  # (B, R) 1 up to and including the first stop token
    logprobs: torch.Tensor  # (B, R) log π_old(token) at sampling temperature
    ref_logprobs: torch.Tensor  # (B, R) log π_ref(token)
    values: torch.Tensor  # (B, R) V(state before token)
    scores: torch.Tensor  # (B,) reward of the whole response (RM / judge, after penalties)
    response_texts: list[str]  # B decoded responses
    gold: torch.Tensor | None = None  # (B,) gold-judge score, for monitoring only
    has_stop: torch.Tensor | None = None  # (B,) whether the response ended with a stop token
    rewards: torch.Tensor | None = None  # (B, R) per-token rewards: -β·KL, plus the score at the last token
    kl: torch.Tensor | None = None  # (B, R) per-token KL estimate
    advantages: torch.Tensor | None = None  # (B, R) whitened GAE advantages
    returns: torch.Tensor | None = None  # (B, R) value targets
    timings: dict[str, float] = field(default_factory=dict)
    # (logits (B, R, V) or None, values (B, R)) with their autograd graphs, kept by `collect_rollout(keep_graph=True)`:
    # the training forward of the first PPO epoch when one micro-batch holds the whole batch (rlhf.ppo.ppo_update)
    first_forward: tuple[torch.Tensor | None, torch.Tensor] | None = None

    @property
    def query_responses(self) -> torch.Tensor:
        return torch.cat([self.queries, self.responses], dim=1)  # (B, P + R)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.query_mask, self.response_mask.long()], dim=1)  # (B, P + R)


@torch.no_grad()
def forward_logprobs(model: PolicyAndValue, policy_override, query_responses, attention_mask, responses,
                     context_length: int, temperature: float, micro_batch_size: int, with_values: bool):
    """Logprobs (B, R) of `responses` and values (B, R), in micro-batches (one forward per model)."""
    logprobs, values = [], []
    for i in range(0, query_responses.shape[0], micro_batch_size):
        qr, am = query_responses[i:i + micro_batch_size], attention_mask[i:i + micro_batch_size]
        if policy_override is None:
            logits, v = model(qr, am, context_length, with_values=with_values)
        else:
            trunk, lm_head = causal_lm_parts(policy_override)
            hidden = trunk(input_ids=qr, attention_mask=am, position_ids=position_ids_from_mask(am),
                           use_cache=False).last_hidden_state
            logits, v = lm_head(response_states(hidden, context_length)), None
        logprobs.append(logprobs_from_logits(logits, responses[i:i + micro_batch_size], temperature))
        if v is not None:
            values.append(v)
        del logits
    return torch.cat(logprobs), (torch.cat(values) if values else None)


@torch.no_grad()
def collect_rollout(model: PolicyAndValue, ref_policy, prompts: list[Any], prompt_ids: list[list[int]],
                    tokenizer, score_fn: Callable[[list[Any], list[str]], torch.Tensor],
                    gold_fn: Callable[[list[str]], list[float]] | None, *, max_new_tokens: int, temperature: float,
                    stop_ids: list[int], micro_batch_size: int, missing_eos_penalty: float | None = None,
                    score_clip: float | None = None, sampler=None, min_new_tokens: int = 0,
                    keep_graph: bool = False) -> Rollout:
    """Sample one batch and compute logprobs, reference logprobs, values and scores (DESIGN details 1-4).

    `sampler` is the model that generates (default: the policy), e.g. a bf16 copy of fp32 weights.
    `keep_graph`: run the policy-and-value forward over the whole batch with autograd on and keep it in
    `Rollout.first_forward`. When one micro-batch holds the batch, the first PPO epoch's forward sees the
    same weights and the same rows, so it is this one: the update starts from it instead of computing it again."""
    import time

    timings = {}
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    # 1. sample from left-padded prompts, cut after the first stop token
    queries, query_mask = left_pad(prompt_ids, tokenizer.pad_token_id, device)
    generator = sampler or unwrap(model).policy
    # When the policy samples itself without autocast, generation computes the very logits of the training
    # forward (up to float rounding of the KV cache): its logprobs are kept, and with a separate critic the
    # policy forward of step 2 is skipped.
    reuse = sampler is None and unwrap(model).critic is not None and not torch.is_autocast_enabled(device.type)
    # the sampler already holds its weights in its dtype; a policy trained with eager attention samples with
    # the attention it was loaded with (faster at generation)
    with torch.autocast(device.type, enabled=False), \
            attention_implementation(generator, unwrap(model).generation_attention):
        responses, response_mask, *sampled_logprobs = sample(
            generator, queries, query_mask, max_new_tokens, temperature, stop_ids, tokenizer.pad_token_id,
            min_new_tokens=min_new_tokens, return_logprobs=reuse)
    timings["generate"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    # 2. policy logprobs and values, reference logprobs: one forward each over prompt + response
    query_responses = torch.cat([queries, responses], dim=1)
    attention_mask = torch.cat([query_mask, response_mask.long()], dim=1)
    P = queries.shape[1]
    logits = None
    with torch.set_grad_enabled(keep_graph):  # kept: one micro-batch holds the batch (see the docstring)
        if reuse:  # the policy's logprobs come from generation: only the critic's forward is due
            logprobs = sampled_logprobs[0]
            values = torch.cat([unwrap(model).critic_values(query_responses[i:i + micro_batch_size],
                                                            attention_mask[i:i + micro_batch_size], P)
                                for i in range(0, len(responses), micro_batch_size)])
        elif keep_graph:
            logits, values = model(query_responses, attention_mask, P)
            logprobs = logprobs_from_logits(logits.detach(), responses, temperature)
        else:
            logprobs, values = forward_logprobs(model, None, query_responses, attention_mask, responses, P,
                                                temperature, micro_batch_size, with_values=True)
    first_forward = (logits, values) if keep_graph else None
    values = values.detach()
    with reference_mode(unwrap(model), ref_policy) as ref:
        ref_logprobs, _ = forward_logprobs(model, ref, query_responses, attention_mask, responses, P, temperature,
                                           micro_batch_size, with_values=False)
    timings["forward"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    # 3. score the decoded text (the RM may use another tokenizer), penalise missing stop tokens
    texts = decode_responses(tokenizer, responses, response_mask)
    scores = score_fn(prompts, texts).to(device).float()  # (B,)
    has_stop = (torch.isin(responses, torch.tensor(stop_ids, device=device)) & response_mask.bool()).any(dim=1)
    if missing_eos_penalty is not None:
        scores = torch.where(has_stop, scores, scores - missing_eos_penalty)
    if score_clip is not None:
        scores = scores.clamp(-score_clip, score_clip)
    gold = torch.tensor(gold_fn(texts), device=device) if gold_fn is not None else None
    timings["score"] = time.perf_counter() - t0
    bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
    if bad:
        raise TrainingFault(f"non-finite reward scores for {len(bad)} of {len(texts)} responses (e.g. "
                            f"{scores[bad[0]].item()} for {texts[bad[0]][:60]!r}): a reward model trained to NaN, "
                            f"or a reward function (ppo.reward) that returns NaN or inf?")
    return Rollout(prompts, queries, query_mask, responses, response_mask, logprobs, ref_logprobs, values, scores,
                   texts, gold=gold, has_stop=has_stop, timings=timings, first_forward=first_forward)
