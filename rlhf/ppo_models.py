"""The models of the PPO stage and the one way each of them reads prompt + response tokens.

`build_models` returns what DESIGN detail 8 describes: the trained `PolicyAndValue` (policy, LoRA or
not, and a value head or a separate critic), the frozen reference (a copy, or the policy with its
adapters disabled), and a plain generation copy in the run's dtype (rounded stochastically, see
`sync_sampler`). `Sequences` holds a batch as every model reads it (ids, attention mask, position ids,
built once); `response_forward` is the forward all of them share: trunk over the whole sequence, LM head
only on the response positions.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from rlhf.models import (load_causal_lm, load_reward_model, load_tokenizer, round_stochastic, same_tokenizer,
                         set_training_attention)


class Sequences(NamedTuple):
    """Prompt + response rows as the models read them (DESIGN detail 1). A tuple, so `model(*seqs)` passes
    plain tensors through any engine's wrapper."""

    input_ids: torch.Tensor  # (B, P + R) left-padded prompt, then the response
    attention_mask: torch.Tensor  # (B, P + R) 1 on prompt tokens and on the response up to its stop token
    position_ids: torch.Tensor  # (B, P + R) cumsum(mask) - 1: a token's position ignores the left padding
    context_length: int  # P: response token t is predicted from position P - 1 + t

    @classmethod
    def join(cls, queries: torch.Tensor, query_mask: torch.Tensor, responses: torch.Tensor,
             response_mask: torch.Tensor) -> Sequences:
        attention_mask = torch.cat([query_mask, response_mask.long()], dim=1)
        position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
        return cls(torch.cat([queries, responses], dim=1), attention_mask, position_ids, queries.shape[1])

    def rows(self, index) -> Sequences:
        return Sequences(self.input_ids[index], self.attention_mask[index], self.position_ids[index],
                         self.context_length)


def causal_lm_parts(model) -> tuple[nn.Module, nn.Module]:
    """(trunk, lm_head) of a causal LM, also through a PEFT wrapper (LoRA layers live inside them)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.base_model, base.get_output_embeddings()


def response_states(trunk: nn.Module, seqs: Sequences) -> torch.Tensor:
    """Hidden states (B, R, H) before each response token, contiguous: a strided slice fed to a frozen
    `nn.Linear` (LoRA's LM head, a frozen reference) makes `matmul` expand the weight to a batched copy per
    row instead of one matrix product (4x slower forward on the CPU, measured on SmolLM2's tied 49k head)."""
    hidden = trunk(input_ids=seqs.input_ids, attention_mask=seqs.attention_mask, position_ids=seqs.position_ids,
                   use_cache=False).last_hidden_state  # (B, P + R, H)
    return hidden[:, seqs.context_length - 1: -1].contiguous()


def response_forward(lm: nn.Module, seqs: Sequences) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (B, R, V) predicting each response token, the hidden states (B, R, H) they come from); only
    response positions reach the LM head."""
    trunk, lm_head = causal_lm_parts(lm)
    hidden = response_states(trunk, seqs)
    return lm_head(hidden), hidden


class PolicyAndValue(nn.Module):
    """The policy and its value function: a zero-initialised head on the policy trunk, a critic, or none
    (`value_head=False`: the values are None). One module, so that accelerate prepares (and an engine wraps)
    the trained weights together."""

    def __init__(self, policy: nn.Module, critic: nn.Module | None = None, value_head: bool = True):
        super().__init__()
        self.policy = policy
        self.critic = critic
        # the attention the policy was loaded with: training may switch it (eager on the CPU), sampling
        # from the policy itself switches back to it
        self.generation_attention = policy.config._attn_implementation
        if critic is None and value_head:
            hidden = policy.config.get_text_config().hidden_size
            self.value_head = nn.Linear(hidden, 1)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
        else:
            self.value_head = None

    @property
    def has_values(self) -> bool:
        return self.critic is not None or self.value_head is not None

    @property
    def _no_split_modules(self) -> list[str]:
        """The layer classes an engine shards as units (FSDP2's auto-wrap): the policy's and the critic's."""
        names = [*(getattr(self.policy, "_no_split_modules", None) or [])]
        if self.critic is not None:
            names += [n for n in getattr(self.critic, "_no_split_modules", None) or [] if n not in names]
        return names

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                context_length: int, what: str = "both"):
        """(logits (B, R, V) predicting each response token, values (B, R) of the states before them, None
        without a value function); the arguments are a `Sequences`. `what` picks the forward: "both", "logits"
        (values None), "values" (the critic alone; logits None) or "reference" (the policy with its LoRA adapters
        disabled; values None).
        Every forward of the trained weights comes through here, where an engine's wrapper gathers them."""
        seqs = Sequences(input_ids, attention_mask, position_ids, context_length)
        if what == "values":
            return None, self.critic_values(seqs)
        if what == "reference":
            with self.policy.disable_adapter():
                return response_forward(self.policy, seqs)[0], None
        logits, hidden = response_forward(self.policy, seqs)
        if what == "logits" or not self.has_values:
            return logits, None
        if self.critic is None:
            values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)  # (B, R)
        else:
            values = self.critic_values(seqs)
        return logits, values.float()

    def critic_values(self, seqs: Sequences) -> torch.Tensor:
        """Values (B, R) from the separate critic alone."""
        return self.critic.score(response_states(self.critic.base_model, seqs)).squeeze(-1).float()


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


def add_lora(policy, pc):
    """Wrap the policy with LoRA adapters on every linear layer (B starts at 0: policy == reference)."""
    from peft import LoraConfig, get_peft_model  # peft takes ~1 s to import: only LoRA runs need it

    return get_peft_model(policy, LoraConfig(task_type="CAUSAL_LM", r=pc.lora_r, lora_alpha=pc.lora_alpha,
                                             lora_dropout=0.0, target_modules="all-linear"))


@dataclass
class PPOModels:
    model: PolicyAndValue  # the trained weights
    reference: nn.Module | None  # the frozen reference; None with LoRA (the policy with adapters disabled)
    sampler: nn.Module | None  # the generation copy in the run's dtype; None: the policy samples itself
    tokenizer: object


def build_models(cfg, reward_dir: Path, device, dtype, sharded: bool = False) -> PPOModels:
    """The PPO stage's models, as DESIGN detail 8 describes, on `device`. `sharded`: the trained weights will be
    split over processes (FSDP2, ZeRO-3), so generation runs from a whole copy (`needs_sampler`)."""
    tokenizer = load_tokenizer(cfg.model.policy, cfg.model.trust_remote_code)
    # Trained weights are fp32 (bf16 comes through autocast); LoRA's frozen base and the reference are
    # stored in `dtype` directly.
    policy = load_causal_lm(cfg.model.policy, dtype if cfg.ppo.lora else torch.float32, cfg.model.trust_remote_code)
    ref_policy = None
    if cfg.ppo.lora:
        policy = add_lora(policy, cfg.ppo)
    else:
        ref_policy = load_causal_lm(cfg.model.policy, dtype, cfg.model.trust_remote_code).eval()
        ref_policy.requires_grad_(False)
    critic = None
    if cfg.ppo.value_model == "critic":
        rm_tokenizer = load_tokenizer(str(reward_dir), cfg.model.trust_remote_code)
        if same_tokenizer(rm_tokenizer, tokenizer):
            critic = load_reward_model(str(reward_dir), torch.float32, cfg.model.trust_remote_code)
        else:  # the RM reads another vocabulary: start the critic from the policy's own backbone
            critic = load_reward_model(cfg.model.policy, torch.float32, cfg.model.trust_remote_code,
                                       cfg.reward.num_layers)
    # eval mode, as it samples (ppo_update trains in train mode); records the attention the policy samples with
    model = PolicyAndValue(policy, critic, value_head=cfg.ppo.value_model == "head").to(device).eval()
    for trained in (policy, critic):
        if trained is not None:
            set_training_attention(trained, device)
    model.policy.config.use_cache = True
    if ref_policy is not None:
        ref_policy.to(device)
    sampler = None
    if needs_sampler(cfg.ppo, dtype, sharded):
        # Generation runs from a plain copy in `dtype`, refreshed after every update: with LoRA the
        # adapters are merged into it, so sampling pays neither the adapter path nor fp32 casts.
        # It only runs under no_grad, yet its parameters keep requires_grad=True: `generate` feeds the LM head
        # a strided last-position slice, and with a frozen 3-D input/weight pair `matmul` copies the head
        # once per row (sampling measured ~25% slower on the CPU; see `response_states`).
        sampler = load_causal_lm(cfg.model.policy, dtype, cfg.model.trust_remote_code).to(device).eval()
        sync_sampler(sampler, policy, rounding_generator(cfg.run.seed, device))
    return PPOModels(model, ref_policy, sampler, tokenizer)


def rounding_generator(seed: int, device, update: int = 0) -> torch.Generator:
    """The random stream of stochastic rounding (`round_stochastic`) at a PPO update, apart from every other stream
    of the run, and the same on every process (their samplers hold the same weights)."""
    return torch.Generator(torch.device(device)).manual_seed((seed + 7_000_003) * 1_000_003 + update)


def needs_sampler(pc, dtype: torch.dtype, sharded: bool = False) -> bool:
    """Whether generation runs from a separate copy: with LoRA (merged adapters), in a dtype other than the
    trained fp32 weights', or when an engine shards them (FSDP2, ZeRO-3: each token of `generate` would
    otherwise gather every layer again; the copy is refreshed from the gathered weights once per update)."""
    return pc.lora or dtype != torch.float32 or sharded


def reuses_sampling_logprobs(pc, dtype: torch.dtype) -> bool:
    """Whether a rollout keeps the logprobs of generation and skips the policy's forward (`collect_rollout`):
    the fp32 policy samples itself, without autocast, and a separate critic (or no value function) gives the
    values."""
    return not needs_sampler(pc, dtype) and pc.value_model in ("critic", "none")


@torch.no_grad()
def sync_sampler(sampler, policy, generator: torch.Generator) -> None:
    """Copy the trained weights into the generation copy: W for full fine-tuning, W + BA for LoRA, rounded
    stochastically when the copy's dtype is narrower (`round_stochastic`: with round-to-nearest the bf16
    copy would drop every part of the update below half a bf16 step, and sample from a policy that lags the
    trained one). `generator` draws the roundings, on the copy's device."""
    if not hasattr(policy, "get_base_model"):
        for target, source in zip(sampler.parameters(), policy.parameters()):
            target.copy_(round_stochastic(source, target.dtype, generator))
        return
    for name, weight in lora_merged_weights(policy):
        target = sampler.get_submodule(name).weight
        target.copy_(round_stochastic(weight, target.dtype, generator))


@torch.no_grad()
def merge_lora(policy, generator: torch.Generator):
    """A LoRA policy as a plain model: W + BA computed in fp32 and stored in the base's dtype, rounded
    stochastically where that is narrower (see `sync_sampler`; peft's `merge_and_unload` adds in the base's
    dtype, rounding to nearest). Changes `policy`'s base model in place and returns it."""
    for name, weight in lora_merged_weights(policy):  # one layer at a time: W + BA is computed before W changes
        base = policy.get_base_model().get_submodule(name).base_layer
        base.weight.copy_(round_stochastic(weight, base.weight.dtype, generator))
    return policy.unload()


def lora_merged_weights(policy):
    """(name of the layer in the base model, W + BA in fp32) for each LoRA layer of `policy`."""
    from peft.tuners.lora import LoraLayer  # peft: only LoRA runs need it

    prefix = "base_model.model."
    for name, module in policy.named_modules():
        if isinstance(module, LoraLayer):
            adapter = module.active_adapter[0] if isinstance(module.active_adapter, list) else module.active_adapter
            merged = module.base_layer.weight.float() + module.get_delta_weight(adapter).float()
            yield name[len(prefix):] if name.startswith(prefix) else name, merged
