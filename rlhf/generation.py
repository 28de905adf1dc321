"""Batched sampling from left-padded prompts, shared by the prefs, PPO and eval stages."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessorList
from transformers.cache_utils import DynamicLayer

from rlhf.ppo_core import logprobs_from_logits, response_lengths, truncate_after_stop_token, zero_masked
from rlhf.utils import UserError


def left_pad(seqs: list[list[int]], pad_token_id: int, device: torch.device | str = "cpu"):
    """Left-pad token lists into (input_ids, attention_mask), both (B, P)."""
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            input_ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            attention_mask[i, width - len(s):] = 1
    return input_ids.to(device), attention_mask.to(device)


def stop_token_ids(tokenizer, extra: list[str] | None = None) -> list[int]:
    """Token ids that end a response: EOS (and the model's other EOS ids), plus single-token extras."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    for text in extra or []:
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(tokens) != 1:
            raise UserError(f"stop token {text!r} is {len(tokens)} tokens for this tokenizer; use a single-token string")
        ids.add(tokens[0])
    return sorted(ids)


def draw_by_inverse_cdf(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """One token id per row (B,) drawn from softmax(scores (B, V) / T): a uniform draw per row located in the
    cumulative distribution (summed in float64, so even the smallest probabilities keep their mass)."""
    cdf = torch.softmax(scores.float() / temperature, dim=-1).cumsum(-1, dtype=torch.float64)
    u = torch.rand(scores.shape[0], 1, dtype=torch.float64, device=scores.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=scores.shape[-1] - 1)[:, 0]


def sample_by_inverse_cdf(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """`draw_by_inverse_cdf` as scores: 0 at the drawn token and -inf elsewhere, so greedy decoding emits it."""
    tokens = draw_by_inverse_cdf(scores, temperature)
    return torch.full_like(scores, float("-inf")).scatter_(1, tokens[:, None], 0.0)


class InverseCDFSampling:
    """A logits processor that samples: run under greedy decoding, it replaces HF's sampling step.

    `torch.multinomial` on the CPU draws one exponential per vocabulary entry, 49k per row per step
    for SmolLM2: about a quarter of the time of sampling 128 rows. This draws one number per row.
    It runs after HF's other processors (min_new_tokens), as sampling does."""

    def __init__(self, temperature: float):
        self.temperature = temperature

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return sample_by_inverse_cdf(scores, self.temperature)


@dataclass
class Responses:
    """Sampled responses (B, R), cut after their first stop token. The mask is born here, bool, once: the
    rollout, the scores, the metrics and the evaluation all read it."""

    ids: torch.Tensor  # (B, R) token ids, padding after the first stop token
    mask: torch.Tensor  # (B, R) bool: True up to and including the first stop token
    has_stop: torch.Tensor  # (B,) bool: the response ended with a stop token (else it was cut at R)
    lengths: torch.Tensor  # (B,) real tokens per response
    logprobs: torch.Tensor | None = None  # (B, R) the sampler's own logprobs at its temperature, 0 on padding


@torch.no_grad()
def sample(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
           temperature: float, stop_ids: list[int], pad_token_id: int, greedy: bool = False,
           min_new_tokens: int = 0, return_logprobs: bool = False) -> Responses:
    """Sample responses with the KV cache; R is always `max_new_tokens`.

    Tokens are drawn from softmax(logits / T) itself (no top-k / top-p), the distribution the PPO
    logprobs describe. Responses are cut after their first stop token (kept, mask True); the rest
    is padding. With `return_logprobs`, also the (B, R) log-probabilities of the sampled tokens under
    the model's raw logits at `temperature`.

    The decode loop is HF `generate`'s (`sample_with_generate`) without its per-step machinery: the
    same forwards with the same inputs (one prefill, then one token per row and step), the same draws
    in the same order, so under one seed both give the same tokens and logprobs. Logits processors that
    a model's generation config would add to `generate` (a repetition penalty, say) are not applied:
    the draws follow the raw logits the logprobs describe.
    """
    batch = input_ids.shape[0]
    stops = torch.tensor(stop_ids, dtype=torch.long, device=input_ids.device)
    responses = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=input_ids.device)
    logprobs = torch.zeros(batch, max_new_tokens, device=input_ids.device) if return_logprobs else None
    unfinished = torch.ones(batch, dtype=torch.bool, device=input_ids.device)
    step_inputs = _first_step_inputs(model, input_ids, attention_mask)
    for t in range(max_new_tokens):
        out = model(**step_inputs)
        logits = out.logits[:, -1].float()  # (B, V)
        scores = logits
        if t < min_new_tokens and len(stop_ids):  # HF MinNewTokensLengthLogitsProcessor: no stop token yet
            vocabulary = torch.arange(logits.shape[-1], device=logits.device)
            scores = logits.masked_fill(torch.isin(vocabulary, stops), float("-inf"))
        tokens = scores.argmax(-1) if greedy else draw_by_inverse_cdf(scores, temperature)  # (B,)
        if len(stop_ids):  # rows that have stopped emit padding, as in `generate`
            tokens = torch.where(unfinished, tokens, pad_token_id)
            unfinished &= ~torch.isin(tokens, stops)
        responses[:, t] = tokens
        if return_logprobs:
            logprobs[:, t] = logprobs_from_logits(logits[:, None], tokens[:, None], temperature)[:, 0]
        if t + 1 == max_new_tokens or not unfinished.any():
            break
        if t == 0:
            _grow_in_place(out[_cache_key(out)], input_ids.shape[1] + max_new_tokens)
        step_inputs = _next_step_inputs(step_inputs, out, tokens)
    responses, mask, has_stop = truncate_after_stop_token(responses, stop_ids, pad_token_id)
    if logprobs is not None:
        logprobs = zero_masked(logprobs, mask)
    return Responses(responses, mask, has_stop, response_lengths(mask), logprobs)


def _first_step_inputs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
    """The prefill's forward arguments, as `generate` builds them: positions count real tokens only (left
    padding sits at position 0), and the LM head runs on the last position only where the model allows it."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT wrapper passes them on
    accepted = inspect.signature(base.forward).parameters
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, use_cache=True, return_dict=True)
    if "position_ids" in accepted:
        inputs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).masked_fill_(attention_mask == 0, 0)
    if "logits_to_keep" in accepted:
        inputs["logits_to_keep"] = 1
    return inputs


def _cache_key(out) -> str:
    """The name under which a forward returns its KV cache and takes it back: `cache`, or `past_key_values`
    in the transformers releases before the rename."""
    return "cache" if "cache" in out else "past_key_values"


def _next_step_inputs(inputs: dict, out, tokens: torch.Tensor) -> dict:
    """One decode step's forward arguments: the new token, its position, the mask grown by one, the cache."""
    inputs = dict(inputs, input_ids=tokens[:, None], **{_cache_key(out): out[_cache_key(out)]})
    mask = inputs["attention_mask"]
    inputs["attention_mask"] = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    if "position_ids" in inputs:
        inputs["position_ids"] = inputs["position_ids"][:, -1:] + 1
    return inputs


class GrowInPlaceLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values are views into buffers sized once for the whole response.

    `DynamicLayer.update` concatenates: every decode step copies the layer's whole cache, keys and values
    (for SmolLM2 at 32 rows on the CPU, about an eighth of a decode step). Here a step writes its own
    position only.
    Attention reads the same values in the same shapes (only the stride between heads differs), so the
    logits are the very same."""

    _layer_type = None  # never registered as a layer type that transformers builds by itself

    def __init__(self, layer: DynamicLayer, capacity: int):
        super().__init__()
        keys, values = layer.keys, layer.values  # (B, H, P, D)
        self.device, self.is_initialized = keys.device, True
        self.key_buffer = keys.new_empty(*keys.shape[:2], capacity, keys.shape[3])
        self.value_buffer = values.new_empty(*values.shape[:2], capacity, values.shape[3])
        self.keys, self.values = self.key_buffer[:, :, :0], self.value_buffer[:, :, :0]
        self.update(keys, values)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        start, end = self.keys.shape[2], self.keys.shape[2] + key_states.shape[2]
        self.key_buffer[:, :, start:end] = key_states
        self.value_buffer[:, :, start:end] = value_states
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
        return self.keys, self.values


def _grow_in_place(cache, capacity: int) -> None:
    """Swap the plain dynamic layers of a model's cache for `GrowInPlaceLayer`s of `capacity` positions; other
    layer kinds (sliding windows, linear attention) and caches without layers are left as they are."""
    layers = getattr(cache, "layers", None)
    for i, layer in enumerate(layers if isinstance(layers, list) else []):
        if type(layer) is DynamicLayer and layer.is_initialized and layer.keys.dim() == 4:
            layers[i] = GrowInPlaceLayer(layer, capacity)


@torch.no_grad()
def sample_with_generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                         temperature: float, stop_ids: list[int], pad_token_id: int, greedy: bool = False,
                         min_new_tokens: int = 0, return_logprobs: bool = False) -> Responses:
    """`sample` through HF `generate` (greedy decoding with `InverseCDFSampling` as its logits processor):
    the reference that `sample` reproduces draw for draw (tests, benchmarks/sampling.py)."""
    kwargs = dict(do_sample=False)
    if not greedy:
        kwargs["logits_processor"] = LogitsProcessorList([InverseCDFSampling(temperature)])
    out = model.generate(
        input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens, eos_token_id=stop_ids if stop_ids else None,
        pad_token_id=pad_token_id, use_cache=True, return_dict_in_generate=True, output_logits=return_logprobs,
        **kwargs,
    )
    responses = out.sequences[:, input_ids.shape[1]:]  # (B, <=R)
    logprobs = None
    if return_logprobs:  # one (B, V) row of raw logits per step: reduce each to the sampled token's logprob
        logprobs = torch.stack([logprobs_from_logits(step.unsqueeze(1), responses[:, t:t + 1], temperature)[:, 0]
                                for t, step in enumerate(out.logits)], dim=1)  # (B, <=R)
    width = responses.shape[1]
    if width < max_new_tokens:  # every row stopped early
        fill = torch.full((responses.shape[0], max_new_tokens - width), pad_token_id,
                          dtype=responses.dtype, device=responses.device)
        responses = torch.cat([responses, fill], dim=1)
    responses, mask, has_stop = truncate_after_stop_token(responses, stop_ids, pad_token_id)
    if logprobs is not None:
        logprobs = zero_masked(torch.cat([logprobs, logprobs.new_zeros(logprobs.shape[0], max_new_tokens - width)],
                                         dim=1), mask)
    return Responses(responses, mask, has_stop, response_lengths(mask), logprobs)


def decode_responses(tokenizer, responses: Responses) -> list[str]:
    """Text of each response without its stop token and padding."""
    texts = []
    for ids, mask in zip(responses.ids.tolist(), responses.mask.tolist()):
        ids = [t for t, m in zip(ids, mask) if m]
        texts.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
    return texts


def unwrap(model):
    """The underlying module of a DDP/compiled wrapper (generation needs `.generate`)."""
    while hasattr(model, "module"):
        model = model.module
    return model


def generate_texts(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int, temperature: float,
                   batch_size: int, stop_ids: list[int], greedy: bool = False, progress: str | None = None,
                   device: torch.device | str = "cpu") -> list[str]:
    """Responses (text) for many encoded prompts, in batches, with an optional progress bar."""
    texts: list[str] = []
    starts = range(0, len(prompt_ids), batch_size)
    for start in tqdm(starts, desc=progress, disable=progress is None, unit="batch"):
        ids, mask = left_pad(prompt_ids[start:start + batch_size], tokenizer.pad_token_id, device)
        responses = sample(unwrap(model), ids, mask, max_new_tokens, temperature, stop_ids, tokenizer.pad_token_id,
                           greedy=greedy)
        texts.extend(decode_responses(tokenizer, responses))
    return texts
