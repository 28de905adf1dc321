"""rlhf/rollout.py on a tiny random Llama: padding invariance, temperature, Rollout fields, penalties, references.

DESIGN "PPO details that must be right" 1-3 and 8, checked on real (tiny) models instead of hand tensors.
"""

from __future__ import annotations

import copy

import pytest
import torch

from reward_models.judges import get_judge
from rlhf.generation import left_pad
from rlhf.models import load_causal_lm, load_reward_model, load_tokenizer
from rlhf.prompts import encode_prompts
from rlhf.ppo_models import PolicyAndValue, Sequences
from rlhf.rollout import collect_rollout, forward_tokens

SHORT = "write a good story"
LONG = ("tell me about the weather in the city today and the food and the music and the park and the "
        "coffee in the morning and the evening with my family and my friend")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny-llama")


@pytest.fixture(scope="module")
def base_policy():
    return load_causal_lm("tiny-llama").eval()


def fresh_policy(name="tiny-llama"):
    return load_causal_lm(name).eval()


def encode(tok, prompts):
    return encode_prompts(prompts, tok, max_tokens=256).input_ids


def keyword_score(prompts, texts):
    return torch.tensor(get_judge("keyword:good")(texts), dtype=torch.float32)


def batch_with_response(tok, prompt_ids: list[list[int]], responses: torch.Tensor, response_mask: torch.Tensor):
    """The Sequences of left-padded prompts followed by `responses`."""
    queries, query_mask = left_pad(prompt_ids, tok.pad_token_id)
    return Sequences.join(queries, query_mask, responses, response_mask.bool())


def policy_logprobs(model, seqs, responses, temperature, micro_batch_size, with_values=True):
    """(logprobs, values) of `responses` under a PolicyAndValue."""
    return forward_tokens(model, seqs, responses, temperature, micro_batch_size,
                          what="both" if with_values else "logits")[:2]


def logprobs_alone_and_padded(model, tok, temperature=1.0):
    """Logprobs/values of one response after SHORT, batched alone and next to LONG (left padding)."""
    short, long = encode(tok, [SHORT, LONG])
    assert len(long) > len(short) + 10
    g = torch.Generator().manual_seed(0)
    response = torch.randint(8, len(tok), (1, 7), generator=g)
    mask = torch.ones(1, 7)
    mask[0, 5:] = 0  # a response cut after 5 tokens: padding after it too
    response[0, 5:] = tok.pad_token_id
    alone = policy_logprobs(model, batch_with_response(tok, [short], response, mask), response, temperature, 4)
    other = torch.randint(8, len(tok), (1, 7), generator=g)
    responses = torch.cat([response, other])
    masks = torch.cat([mask, torch.ones(1, 7)])
    seqs = batch_with_response(tok, [short, long], responses, masks)
    assert seqs.attention_mask[0, : seqs.context_length - len(short)].sum() == 0  # the short prompt is left-padded
    padded = policy_logprobs(model, seqs, responses, temperature, 4)
    return alone, padded, mask.bool()


def test_position_ids_ignore_left_padding():
    queries, query_mask = torch.tensor([[0, 0, 5], [4, 5, 6]]), torch.tensor([[0, 0, 1], [1, 1, 1]])
    responses, response_mask = torch.tensor([[7, 8, 0], [7, 8, 9]]), torch.tensor([[True, True, False], [True] * 3])
    seqs = Sequences.join(queries, query_mask, responses, response_mask)
    assert seqs.input_ids.tolist() == [[0, 0, 5, 7, 8, 0], [4, 5, 6, 7, 8, 9]]
    assert seqs.attention_mask.tolist() == [[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
    assert seqs.position_ids.tolist() == [[0, 0, 0, 1, 2, 2], [0, 1, 2, 3, 4, 5]]
    assert seqs.context_length == 3 and seqs.rows([1]).input_ids.tolist() == [[4, 5, 6, 7, 8, 9]]


# Llama's rotary embeddings are relative, so only an absolute-position model (GPT-2) notices wrong position ids.
ARCHS = ["tiny-llama", "tiny-gpt2"]


@pytest.mark.parametrize("name", ARCHS)
def test_padding_invariance_value_head(tok, name):
    model = PolicyAndValue(fresh_policy(name)).eval()
    torch.nn.init.normal_(model.value_head.weight, std=1.0)  # zero-initialised: make the values informative
    torch.nn.init.normal_(model.value_head.bias)
    (lp1, v1), (lp2, v2), mask = logprobs_alone_and_padded(model, tok)
    m = mask[0]
    assert torch.isfinite(lp1).all() and torch.isfinite(lp2).all()
    torch.testing.assert_close(lp1[0][m], lp2[0][m], atol=1e-5, rtol=0)
    torch.testing.assert_close(v1[0][m], v2[0][m], atol=1e-5, rtol=0)
    assert v1[0][m].abs().max() > 1e-3  # the check compares real numbers


@pytest.mark.parametrize("name", ARCHS)
def test_padding_invariance_critic(tok, name):
    critic = load_reward_model(name).eval()  # random score head: non-trivial values
    model = PolicyAndValue(fresh_policy(name), critic).eval()
    assert model.value_head is None
    (lp1, v1), (lp2, v2), mask = logprobs_alone_and_padded(model, tok)
    m = mask[0]
    torch.testing.assert_close(lp1[0][m], lp2[0][m], atol=1e-5, rtol=0)
    torch.testing.assert_close(v1[0][m], v2[0][m], atol=1e-5, rtol=0)
    assert v1[0][m].abs().max() > 1e-4


@pytest.mark.parametrize("name", ARCHS)
def test_padding_invariance_reference_path(tok, name):
    """The policy_override (reference) path uses the same position ids."""
    base_policy = fresh_policy(name)
    model = PolicyAndValue(fresh_policy(name)).eval()
    short, long = encode(tok, [SHORT, LONG])
    response = torch.randint(8, len(tok), (2, 6), generator=torch.Generator().manual_seed(1))
    ones = torch.ones(2, 6)
    seqs = batch_with_response(tok, [short], response[:1], ones[:1])
    alone, _, _ = forward_tokens(model, seqs, response[:1], 1.0, 4, lm=base_policy)
    seqs2 = batch_with_response(tok, [short, long], response, ones)
    padded, _, _ = forward_tokens(model, seqs2, response, 1.0, 1, lm=base_policy)
    torch.testing.assert_close(alone[0], padded[0], atol=1e-5, rtol=0)


def test_forward_logprobs_uses_temperature(tok):
    model = PolicyAndValue(fresh_policy()).eval()
    short, long = encode(tok, [SHORT, LONG])
    responses = torch.randint(8, len(tok), (2, 5), generator=torch.Generator().manual_seed(2))
    seqs = batch_with_response(tok, [short, long], responses, torch.ones(2, 5))
    lp, _ = policy_logprobs(model, seqs, responses, 0.7, 2, with_values=False)
    with torch.no_grad():
        logits = model.policy(input_ids=seqs.input_ids, attention_mask=seqs.attention_mask,
                              position_ids=seqs.position_ids).logits
    P = seqs.context_length
    expected = torch.log_softmax(logits[:, P - 1:-1] / 0.7, dim=-1).gather(-1, responses.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(lp, expected, atol=1e-5, rtol=0)
    at_one, _ = policy_logprobs(model, seqs, responses, 1.0, 2, with_values=False)
    assert (lp - at_one).abs().max() > 1e-3  # the temperature is really applied


# ---------------------------------------------------------------------------------------------
# collect_rollout

PROMPTS = ["write a good story", "tell me about your day", "describe the weather today", "review a movie",
           "write about the city", "tell a story about a dog", "describe your family", "review the food"]


def rollout(model, ref, tok, stop_ids, seed=0, prompts=PROMPTS, score_fn=keyword_score, **kw):
    ids = encode(tok, prompts)
    torch.manual_seed(seed)
    kw = {"max_new_tokens": 6, "temperature": 1.0, "micro_batch_size": 3, **kw}
    return collect_rollout(model, ref, prompts, ids, tok, score_fn, get_judge("keyword:good"), stop_ids=stop_ids, **kw)[0]


def frequent_stop_ids(tok, n=25):
    """EOS plus many common words: some responses stop within a few tokens and some do not."""
    words = "the a and good bad is was it this that i you we to of in on at for with . , ! ? very".split()
    return sorted({tok.eos_token_id, *tok.convert_tokens_to_ids(words[:n])})


def test_collect_rollout_fields(tok):
    model = PolicyAndValue(fresh_policy()).eval()
    ref = fresh_policy()
    stop_ids = frequent_stop_ids(tok)
    r = rollout(model, ref, tok, stop_ids)
    B, R = len(PROMPTS), 6
    P = max(len(x) for x in encode(tok, PROMPTS))
    assert r.queries.shape == (B, P)
    for name in ("logprobs", "ref_logprobs", "values"):
        assert getattr(r, name).shape == (B, R), name
    assert r.responses.ids.shape == r.responses.mask.shape == (B, R)
    assert r.scores.shape == r.gold.shape == r.responses.has_stop.shape == (B,)
    assert len(r.response_texts) == len(r.prompts) == B
    assert r.seqs.input_ids.shape == r.seqs.attention_mask.shape == r.seqs.position_ids.shape == (B, P + R)
    mask = r.response_mask
    assert mask.dtype == torch.bool and torch.equal(r.responses.lengths, mask.sum(1))
    # a prefix of ones, at least the first token, and padding after it
    assert torch.equal(mask, mask.long().cumprod(1).bool())
    assert mask[:, 0].all()
    assert (r.responses.ids[~mask] == tok.pad_token_id).all()
    assert torch.isfinite(r.logprobs[mask]).all() and (r.logprobs[mask] <= 0).all()
    # has_stop: a stop token is the last real token, nothing after it; rows without one use all R tokens
    stops = torch.tensor(stop_ids)
    for i in range(B):
        n = int(mask[i].sum())
        real = r.responses.ids[i, :n]
        if r.responses.has_stop[i]:
            assert real[-1].item() in stop_ids and not torch.isin(real[:-1], stops).any()
        else:
            assert n == R and not torch.isin(real, stops).any()
    assert 0 < int(r.responses.has_stop.sum()) < B, "the seed should give both kinds of rows"
    # scores are the judge's on the decoded text; the prompts are left-padded
    assert r.scores.tolist() == get_judge("keyword:good")(r.response_texts)
    assert torch.equal(r.gold.float(), r.scores)
    query_mask = r.seqs.attention_mask[:, :P]
    assert (query_mask.sum(1) == torch.tensor([len(x) for x in encode(tok, PROMPTS)])).all()
    assert torch.equal(query_mask, query_mask.flip(1).cumprod(1).flip(1))  # zeros only on the left


def test_generation_logprobs_equal_the_training_forward_with_a_critic(tok):
    # fp32, the policy samples itself, separate critic: the rollout keeps generation's logprobs and skips
    # the policy forward; they must be the logprobs the training forward computes
    critic = load_reward_model("tiny-llama")
    model = PolicyAndValue(fresh_policy(), critic).eval()
    stop_ids = frequent_stop_ids(tok)
    r = rollout(model, fresh_policy(), tok, stop_ids, temperature=0.7)
    mask = r.response_mask
    again, values = policy_logprobs(model, r.seqs, r.responses.ids, 0.7, micro_batch_size=3)
    assert torch.allclose(r.logprobs[mask], again[mask], atol=1e-5)
    assert (r.logprobs[~mask] == 0).all()
    assert torch.allclose(r.values[mask], values[mask], atol=1e-5)
    assert 0 < int(r.responses.has_stop.sum()) < len(PROMPTS)


def test_without_a_value_function_the_rollout_runs_only_the_reference(tok):
    # fp32, the policy samples itself, no value function (ppo.value_model: none): generation's logprobs are
    # the policy's, values are None, and the only forward over prompt + response is the reference's
    model = PolicyAndValue(fresh_policy(), value_head=False).eval()
    assert not model.has_values and model.value_head is None and model.critic is None
    passes = []
    model.policy.model.register_forward_pre_hook(lambda m, a, kw: passes.append(kw["input_ids"].shape[1]),
                                                 with_kwargs=True)
    r = rollout(model, fresh_policy(), tok, frequent_stop_ids(tok), temperature=0.7)
    assert r.values is None
    full = r.seqs.input_ids.shape[1]
    assert full not in passes  # generation's prefill and steps are shorter than prompt + response
    again, values = policy_logprobs(model, r.seqs, r.responses.ids, 0.7, micro_batch_size=3)
    assert values is None
    mask = r.response_mask
    assert torch.allclose(r.logprobs[mask], again[mask], atol=1e-5)


def test_missing_eos_penalty_only_for_rows_without_stop(tok):
    model = PolicyAndValue(fresh_policy()).eval()
    ref = fresh_policy()
    stop_ids = frequent_stop_ids(tok)
    plain = rollout(model, ref, tok, stop_ids, seed=3, max_new_tokens=3)
    penalised = rollout(model, ref, tok, stop_ids, seed=3, max_new_tokens=3, missing_eos_penalty=2.5)
    assert torch.equal(plain.responses.ids, penalised.responses.ids)  # same seed, same samples
    assert 0 < int(plain.responses.has_stop.sum()) < len(PROMPTS)
    expected = plain.scores - 2.5 * (~plain.responses.has_stop).float()
    torch.testing.assert_close(penalised.scores, expected)
    clipped = rollout(model, ref, tok, stop_ids, seed=3, max_new_tokens=3, missing_eos_penalty=2.5, score_clip=1.0)
    assert clipped.scores.min() >= -1.0 and clipped.scores.max() <= 1.0


def test_logprobs_equal_ref_at_init_full_copy(tok):
    model = PolicyAndValue(fresh_policy()).eval()
    r = rollout(model, fresh_policy(), tok, [tok.eos_token_id], max_new_tokens=8)
    mask = r.response_mask
    torch.testing.assert_close(r.logprobs[mask], r.ref_logprobs[mask], atol=1e-5, rtol=0)


def lora_policy():
    from peft import LoraConfig, get_peft_model

    return get_peft_model(fresh_policy(), LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0,
                                                     target_modules="all-linear"))


def test_lora_reference_is_base_with_adapter_disabled(tok, base_policy):
    model = PolicyAndValue(lora_policy()).eval()
    r = rollout(model, None, tok, [tok.eos_token_id], max_new_tokens=8)
    mask = r.response_mask
    # LoRA B is zero before training: the policy is its reference
    torch.testing.assert_close(r.logprobs[mask], r.ref_logprobs[mask], atol=1e-5, rtol=0)

    with torch.no_grad():  # "train" the adapter
        g = torch.Generator().manual_seed(0)
        changed = 0
        for name, p in model.policy.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
                changed += 1
    assert changed > 0
    r = rollout(model, None, tok, [tok.eos_token_id], max_new_tokens=8, seed=1)
    mask = r.response_mask
    assert (r.logprobs - r.ref_logprobs)[mask].abs().max() > 1e-2  # the adapter changed the policy
    base_lp, _, _ = forward_tokens(model, r.seqs, r.responses.ids, 1.0, 4, lm=base_policy)
    torch.testing.assert_close(r.ref_logprobs[mask], base_lp[mask], atol=1e-5, rtol=0)
    through_model, _, _ = forward_tokens(model, r.seqs, r.responses.ids, 1.0, 4, what="reference")
    torch.testing.assert_close(through_model, r.ref_logprobs, atol=1e-6, rtol=0)
    again, _ = policy_logprobs(model, r.seqs, r.responses.ids, 1.0, 4, with_values=False)
    torch.testing.assert_close(again[mask], r.logprobs[mask], atol=1e-5, rtol=0)


def test_non_finite_score_raises(tok):
    model = PolicyAndValue(fresh_policy()).eval()

    def nan_score(prompts, texts):
        scores = torch.zeros(len(texts))
        scores[1] = float("nan")
        return scores

    with pytest.raises(FloatingPointError, match="non-finite"):
        rollout(model, fresh_policy(), tok, [tok.eos_token_id], score_fn=nan_score)

    def inf_score(prompts, texts):
        return torch.full((len(texts),), float("inf"))

    with pytest.raises(FloatingPointError):
        rollout(model, fresh_policy(), tok, [tok.eos_token_id], score_fn=inf_score)


def test_rollout_does_not_change_weights(tok):
    model = PolicyAndValue(fresh_policy()).eval()
    before = copy.deepcopy(model.state_dict())
    rollout(model, fresh_policy(), tok, [tok.eos_token_id])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_dropout_off_in_train_mode(tmp_path, name):
    """DESIGN detail 5: PPO trains with model.train(); with dropout off its logprobs and values equal eval mode's."""
    import json
    import shutil

    from rlhf.models import resolve_model

    folder = tmp_path / name
    shutil.copytree(resolve_model(name), folder)
    config = json.loads((folder / "config.json").read_text())
    for key in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if key in config or name == "tiny-llama" and key == "attention_dropout":
            config[key] = 0.5
    (folder / "config.json").write_text(json.dumps(config))
    tok = load_tokenizer(str(folder))
    model = PolicyAndValue(load_causal_lm(str(folder)), load_reward_model(str(folder)))
    ids = encode(tok, [SHORT, LONG])
    responses = torch.randint(8, len(tok), (2, 5), generator=torch.Generator().manual_seed(0))
    seqs = batch_with_response(tok, ids, responses, torch.ones(2, 5))
    model.eval()
    lp_eval, v_eval = policy_logprobs(model, seqs, responses, 1.0, 2)
    model.train()
    lp_train, v_train = policy_logprobs(model, seqs, responses, 1.0, 2)
    torch.testing.assert_close(lp_train, lp_eval, atol=1e-5, rtol=0)
    torch.testing.assert_close(v_train, v_eval, atol=1e-5, rtol=0)
