"""The eval stage's KL: the exact per-position KL over the vocabulary, against a hand computation from the
plain model forward, and against the sampled (k1) estimate it replaces as the headline figure."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.evaluate import answer_logprobs
from rlhf.generation import left_pad, sample
from rlhf.models import load_causal_lm, load_tokenizer
from rlhf.ppo_models import Sequences
from rlhf.prompts import encode_prompts

TEMPERATURE = 0.8
PROMPTS = ["write a good story", "tell me about your day", "describe the weather today", "review a movie",
           "write about the city", "tell a story about a dog", "describe your family", "review the food"]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny-llama")


@pytest.fixture(scope="module")
def reference():
    return load_causal_lm("tiny-llama").eval()


@pytest.fixture(scope="module")
def policy():
    """The reference with every weight moved by seeded noise: a policy some nats away from it."""
    model = load_causal_lm("tiny-llama").eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(2.0 * p.abs().mean() * torch.randn(p.shape, generator=g))
    return model


def answers(policy, tok, repeats: int, seed: int = 0) -> tuple[Sequences, object]:
    """`repeats` sampled answers of the policy per prompt, cut at EOS or at a few frequent words (so the answers'
    lengths differ), as the eval samples them."""
    ids = encode_prompts(PROMPTS * repeats, tok, max_tokens=64).input_ids
    queries, mask = left_pad(ids, tok.pad_token_id)
    stops = sorted({tok.eos_token_id, *tok.convert_tokens_to_ids(["the", "a", "."])})
    torch.manual_seed(seed)
    responses = sample(policy, queries, mask, 8, TEMPERATURE, stops, tok.pad_token_id)
    return Sequences.join(queries, mask, responses.ids, responses.mask), responses


def test_exact_kl_matches_the_plain_forward(policy, reference, tok):
    seqs, responses = answers(policy, tok, repeats=3)
    lp, ref_lp, kl = answer_logprobs(policy, reference, seqs, responses, TEMPERATURE, batch_size=5)
    assert not responses.mask.all() and responses.mask.any(1).all()  # some answers stop early
    with torch.no_grad():
        logits, ref_logits = (m(input_ids=seqs.input_ids, attention_mask=seqs.attention_mask,
                                position_ids=seqs.position_ids).logits[:, seqs.context_length - 1:-1]
                              for m in (policy, reference))
    logp, logq = (torch.log_softmax(x.double() / TEMPERATURE, -1) for x in (logits, ref_logits))
    m = responses.mask
    expected_kl = (logp.exp() * (logp - logq)).sum(-1) * m
    pick = lambda x: x.gather(-1, responses.ids.unsqueeze(-1)).squeeze(-1) * m  # noqa: E731
    torch.testing.assert_close(kl.double(), expected_kl, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(lp.double(), pick(logp), atol=1e-5, rtol=0)
    torch.testing.assert_close(ref_lp.double(), pick(logq), atol=1e-5, rtol=0)
    assert (kl[~m] == 0).all() and (lp[~m] == 0).all() and (ref_lp[~m] == 0).all()
    assert (kl >= -1e-6).all() and kl.sum(1).min() > 0  # a KL per position: never negative


def test_exact_kl_of_the_reference_to_itself_is_zero(reference, tok):
    seqs, responses = answers(reference, tok, repeats=1)
    lp, ref_lp, kl = answer_logprobs(reference, reference, seqs, responses, TEMPERATURE, batch_size=64)
    assert kl.abs().max() < 1e-6
    torch.testing.assert_close(lp, ref_lp, atol=1e-6, rtol=0)


def test_exact_and_sampled_kl_estimate_the_same_sequence_kl(policy, reference, tok):
    """Both are unbiased estimates of E_π[Σ log π − log π_ref] over the answer: their per-answer difference
    averages to 0 within its standard error, over 512 answers, while the KL itself is several standard
    errors away from 0."""
    seqs, responses = answers(policy, tok, repeats=64, seed=1)
    lp, ref_lp, kl = answer_logprobs(policy, reference, seqs, responses, TEMPERATURE, batch_size=64)
    exact, sampled = kl.sum(1).double(), (lp - ref_lp).sum(1).double()
    n = exact.numel()
    diff = sampled - exact
    se = lambda x: x.std().item() / math.sqrt(n)  # noqa: E731
    assert exact.mean().item() > 10 * se(exact) and exact.mean().item() > 1.0  # a KL well away from 0
    assert abs(diff.mean().item()) < 4 * se(diff), (exact.mean().item(), sampled.mean().item(), se(diff))
