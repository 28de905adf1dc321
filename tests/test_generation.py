"""rlhf.generation.sample against HF `generate` (`sample_with_generate`, the path it replaced): under one seed
both draw the same tokens with the same logprobs, on the tiny models, for every option `sample` has."""

from __future__ import annotations

import pytest
import torch

from rlhf.generation import left_pad, sample, sample_with_generate
from rlhf.models import cast_parameters, load_causal_lm, load_tokenizer

ARCHS = ["tiny-llama", "tiny-gpt2", "tiny-qwen2"]
PROMPTS = ["write a good story about my dog", "a", "tell me about the weather in the city today and the food",
           "i love my cat", "describe the park", "the movie was"] * 3
# frequent words as stop tokens, so that rows stop at different steps and some never stop
STOP_WORDS = [".", ",", "the", "a", "is", "and", "i", "you", "good", "bad", "<eos>"]
R = 10
CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                          reason="needs a CUDA device")])


def prompt_batch(tok, device="cpu"):
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    return left_pad(ids, tok.pad_token_id, device)


def both_paths(model, ids, mask, stop_ids, pad_token_id, temperature=1.0, **options):
    """(reference, new) Responses from the same seed, each with the random state it left and its forwards."""
    results = []
    for fn in (sample_with_generate, sample):
        forwards = []
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # under a PEFT wrapper
        hook = base.register_forward_pre_hook(lambda m, a, k, seen=forwards: seen.append(k["input_ids"].shape[1]),
                                              with_kwargs=True)
        torch.manual_seed(0)
        try:
            out = fn(model, ids, mask, R, temperature, stop_ids, pad_token_id, **options)
        finally:
            hook.remove()
        state = torch.cuda.get_rng_state() if ids.is_cuda else torch.get_rng_state()
        results.append((out, state, forwards))
    return results


def assert_same_draws(reference, new):
    (ref, ref_state, ref_forwards), (out, state, forwards) = reference, new
    assert torch.equal(out.ids, ref.ids)
    assert torch.equal(out.mask, ref.mask)
    assert torch.equal(out.has_stop, ref.has_stop)
    assert torch.equal(out.lengths, ref.lengths)
    assert forwards == ref_forwards  # the same work: one prefill, then one forward per further token
    assert torch.equal(state, ref_state)  # as many draws: the next call starts from the same random state
    assert (out.logprobs is None) == (ref.logprobs is None)
    if ref.logprobs is not None:  # the same forwards: the very same numbers on the CPU
        torch.testing.assert_close(out.logprobs, ref.logprobs, atol=1e-6 if out.logprobs.is_cuda else 0, rtol=0)


def stop_ids_of(tok):
    return sorted(set(tok.convert_tokens_to_ids(STOP_WORDS)))


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("options", [{}, {"greedy": True}, {"min_new_tokens": 4}, {"return_logprobs": True},
                                     {"return_logprobs": True, "temperature": 0.7, "min_new_tokens": 2}],
                         ids=["sampled", "greedy", "min_new_tokens", "logprobs", "logprobs_T0.7_min2"])
def test_sample_draws_what_generate_draws(name, options):
    tok = load_tokenizer(name)
    model = load_causal_lm(name).eval()
    ids, mask = prompt_batch(tok)
    assert mask.sum(1).unique().numel() > 3  # left-padded prompts of several lengths
    reference, new = both_paths(model, ids, mask, stop_ids_of(tok), tok.pad_token_id, **options)
    assert_same_draws(reference, new)
    lengths = new[0].lengths
    if not options.get("greedy"):  # rows stop at different steps, some never: the case is not trivial
        assert lengths.unique().numel() > 2 and (lengths == R).any() and (lengths < R).any()
    assert (lengths >= options.get("min_new_tokens", 0)).all()


@pytest.mark.parametrize("stop", ["none", "every_token"])
def test_sample_matches_generate_without_stops_and_when_all_stop_at_once(stop):
    """No stop token: R tokens every row; every token a stop token: one forward, the rest padding."""
    tok = load_tokenizer("tiny-llama")
    model = load_causal_lm("tiny-llama").eval()
    ids, mask = prompt_batch(tok)
    stop_ids = [] if stop == "none" else list(range(len(tok)))
    reference, new = both_paths(model, ids, mask, stop_ids, tok.pad_token_id, return_logprobs=True)
    assert_same_draws(reference, new)
    assert new[0].lengths.tolist() == [R if stop == "none" else 1] * len(PROMPTS)
    assert len(new[2]) == (R if stop == "none" else 1)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sample_matches_generate_for_each_attention_and_dtype(attention, dtype):
    tok = load_tokenizer("tiny-llama")
    model = cast_parameters(load_causal_lm("tiny-llama"), dtype).eval()
    model.set_attn_implementation(attention)
    ids, mask = prompt_batch(tok)
    assert_same_draws(*both_paths(model, ids, mask, stop_ids_of(tok), tok.pad_token_id, return_logprobs=True))


def test_sample_matches_generate_through_a_lora_wrapper():
    """A PEFT model's forward hides the positions and `logits_to_keep` arguments behind **kwargs: they still
    reach the model, as `generate` passes them (left-padded rows need their positions)."""
    from peft import LoraConfig, get_peft_model

    tok = load_tokenizer("tiny-llama")
    model = get_peft_model(load_causal_lm("tiny-llama"), LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8,
                                                                    target_modules="all-linear")).eval()
    ids, mask = prompt_batch(tok)
    assert_same_draws(*both_paths(model, ids, mask, stop_ids_of(tok), tok.pad_token_id, return_logprobs=True))


def test_successive_calls_stay_in_step():
    """A stage samples batch after batch from one seed: the second batch matches too."""
    tok = load_tokenizer("tiny-qwen2")
    model = load_causal_lm("tiny-qwen2").eval()
    ids, mask = prompt_batch(tok)
    runs = []
    for fn in (sample_with_generate, sample):
        torch.manual_seed(3)
        runs.append([fn(model, ids, mask, R, 1.0, stop_ids_of(tok), tok.pad_token_id).ids for _ in range(3)])
    for ref, out in zip(*runs):
        assert torch.equal(out, ref)
    assert not torch.equal(runs[1][0], runs[1][1])  # the batches differ: the random state moved on


@pytest.mark.parametrize("device", [CUDA])
@pytest.mark.parametrize("name", ARCHS)
def test_sample_draws_what_generate_draws_on_cuda(name, device):
    tok = load_tokenizer(name)
    model = load_causal_lm(name).to(device).eval()
    ids, mask = prompt_batch(tok, device)
    for options in ({}, {"greedy": True}, {"min_new_tokens": 4, "return_logprobs": True}):
        assert_same_draws(*both_paths(model, ids, mask, stop_ids_of(tok), tok.pad_token_id, **options))
