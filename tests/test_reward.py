"""reward_models/train.py, data.py and model.py: a tiny RM learns a separable preference, is normalised and
saved as plain HF; LoRA RMs are merged; an RM with another tokenizer works through PPO (critic from the policy
backbone)."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import reward_models.train as rm_train
from reward_models.data import build_dataset, build_grouped_dataset, collate_groups
from reward_models.model import encode_pairs, format_for_rm, score_texts
from reward_models.train import evaluate_pairs, grouped_reward_trainer, reference_responses, spearman
from rlhf.config import load_config
from rlhf.models import load_reward_model, load_tokenizer, resolve_model, same_tokenizer
from rlhf.pipeline import run_pipeline
from rlhf.stages import is_done
from rlhf.tiny import SPECIALS, WORDS, build_tiny_model
from rlhf.utils import UserError, read_jsonl

PROJECT_ROOT = Path(__file__).resolve().parent.parent
TINY = PROJECT_ROOT / "configs" / "tiny.yaml"
FILLER = [w for w in WORDS if w not in {"good", "bad", "great", "nice", "awful", "fine", "okay"} and w.isalpha()]
NOUNS = ["day", "food", "movie", "book", "city", "rain", "sun", "work", "school", "friend", "family", "music",
         "game", "team", "trip", "home", "car", "train", "dog", "cat", "park", "street", "coffee", "weather"]


def separable_pairs(n=240, seed=0):
    """Chosen responses say "good good good", rejected ones "bad bad bad", inside random filler words."""
    rng = random.Random(seed)

    def filler():
        return " ".join(rng.choice(FILLER) for _ in range(rng.randint(2, 6)))

    rows = []
    for i in range(n):
        noun = NOUNS[i % len(NOUNS)]
        prompt = f"{rng.choice(['write', 'tell', 'describe'])} about the {noun} {rng.choice(FILLER)}"
        rows.append({"prompt": prompt, "chosen": f"{filler()} good good good {filler()}",
                     "rejected": f"{filler()} bad bad bad {filler()}"})
    return rows


def cfg_for(run_dir, data, *overrides):
    return load_config(TINY, [f"run.output_dir={run_dir}", "tracking.wandb=off", "prefs.source=load",
                              f"prefs.dataset={data}", "prefs.test_fraction=0.2", "reward.normalize_samples=48",
                              *overrides])


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in separable_pairs()))
    return path


@pytest.fixture(scope="module")
def rm_run(tmp_path_factory, data_file):
    run_dir = tmp_path_factory.mktemp("rm") / "run"
    cfg = cfg_for(run_dir, data_file)
    run_pipeline(cfg, only="prefs")
    run_pipeline(cfg, only="reward")
    assert is_done(cfg, run_dir, "reward")
    return cfg, run_dir


def rm_metrics(run_dir) -> dict:
    return json.loads((Path(run_dir) / "reward" / "metrics.json").read_text())


def test_reward_model_learns_separable_preference(rm_run):
    cfg, run_dir = rm_run
    m = rm_metrics(run_dir)
    assert m["test_pairs"] >= 20 and m["train_pairs"] + m["test_pairs"] == 240
    assert m["test_accuracy"] > 0.9, m
    assert "test_gold_accuracy" not in m  # loaded pairs carry no gold scores
    assert (run_dir / "reward" / "metrics.jsonl").is_file()


def test_reward_model_weights_changed_from_backbone(rm_run):
    _, run_dir = rm_run
    trained = load_file(str(run_dir / "reward" / "model" / "model.safetensors"))
    base = load_file(str(Path(resolve_model("tiny-llama")) / "model.safetensors"))
    shared = [k for k in trained if k in base]
    assert len(shared) >= len(base) - 1 and "score.weight" in trained
    assert sum(not torch.equal(trained[k], base[k]) for k in shared) > len(shared) // 2


def test_saved_reward_model_is_plain_hf_and_normalised(rm_run):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    cfg, run_dir = rm_run
    folder = run_dir / "reward" / "model"
    config = json.loads((folder / "config.json").read_text())
    m = rm_metrics(run_dir)
    assert config["reward_mean"] == pytest.approx(m["reference_raw_mean"])
    assert config["reward_std"] == pytest.approx(m["reference_raw_std"]) and config["reward_std"] > 0
    assert m["reference_samples"] == 48

    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tok.pad_token_id
    ids = encode_pairs(tok, ["write about the dog"], ["the dog is good good good"], 96)
    assert model(torch.tensor(ids)).logits.shape == (1, 1)

    # the normalisation puts the reference policy's responses at mean 0, std 1
    train_pairs = read_jsonl(run_dir / "prefs" / "train.jsonl")
    prompts, responses = reference_responses(cfg, train_pairs, simulated=False)
    assert len(responses) == 48
    rm_tok = load_tokenizer(str(folder), padding_side="right")
    scores = score_texts(load_reward_model(str(folder)).eval(), rm_tok, prompts, responses, cfg.reward.max_length)
    assert scores.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert scores.std().item() == pytest.approx(1.0, abs=1e-3)
    raw = score_texts(model, rm_tok, prompts, responses, cfg.reward.max_length, normalize=False)
    torch.testing.assert_close(scores, (raw - config["reward_mean"]) / config["reward_std"], atol=1e-5, rtol=0)


def test_score_texts_prefers_good_and_is_padding_independent(rm_run):
    _, run_dir = rm_run
    folder = str(run_dir / "reward" / "model")
    rm, tok = load_reward_model(folder).eval(), load_tokenizer(folder, padding_side="right")
    prompts = ["tell me about the park", "describe the city"]
    good = ["we go to the park and it is good good good", "the city is good good good"]
    bad = ["we go to the park and it is bad bad bad", "the city is bad bad bad"]
    assert (score_texts(rm, tok, prompts, good) > score_texts(rm, tok, prompts, bad)).all()
    # a response scored alone or next to a much longer one (right padding) gets the same score
    alone = score_texts(rm, tok, prompts[1:], good[1:])
    batched = score_texts(rm, tok, prompts, [good[0] + " and the sun and the rain and my family today", good[1]])
    torch.testing.assert_close(alone[0], batched[1], atol=1e-5, rtol=0)


def test_lora_reward_model_is_merged(rm_run, tmp_path):
    _, src = rm_run
    run_dir = tmp_path / "run"
    shutil.copytree(src, run_dir)
    # TRL's own pair batches here, prompt groups elsewhere
    cfg = cfg_for(run_dir, load_config(src / "config.yaml").prefs.dataset, "reward.lora=true", "reward.lora_r=8",
                  "reward.normalize_std=false", "reward.group_by_prompt=false")
    assert is_done(cfg, run_dir, "prefs") and not is_done(cfg, run_dir, "reward")
    run_pipeline(cfg, only="reward")
    folder = run_dir / "reward" / "model"
    saved = load_file(str(folder / "model.safetensors"))
    full = load_file(str(src / "reward" / "model" / "model.safetensors"))
    assert not any("lora" in k or "base_layer" in k or "modules_to_save" in k for k in saved)
    assert set(saved) == set(full)
    base = load_file(str(Path(resolve_model("tiny-llama")) / "model.safetensors"))
    assert any(not torch.equal(saved[k], base[k]) for k in base if k in saved and "proj" in k)  # adapters merged
    m = rm_metrics(run_dir)
    assert m["test_accuracy"] > 0.75, m
    config = json.loads((folder / "config.json").read_text())
    assert config["reward_std"] == 1.0  # normalize_std off: only the mean is removed
    assert config["reward_mean"] == pytest.approx(m["reference_raw_mean"])
    from transformers import AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_pretrained(folder)


# ---------------------------------------------------------------------------------------------
# prompt groups: each response scored once, every pair of the prompt in the loss

GROUP_PAIRS = [  # prompt A: three responses in three pairs; prompt B: one pair
    {"prompt": "write about the dog", "chosen": "the dog is good", "rejected": "the dog is bad", "margin": 0.5},
    {"prompt": "write about the dog", "chosen": "the dog is good", "rejected": "a dog", "margin": 0.0},
    {"prompt": "tell me about the sun", "chosen": "the sun is nice", "rejected": "the sun is awful", "margin": 1.0},
    {"prompt": "write about the dog", "chosen": "a dog", "rejected": "the dog is bad", "margin": 0.25},
]


def test_grouped_dataset_scores_each_response_once():
    tok = load_tokenizer("tiny-llama", padding_side="right")
    ds = build_grouped_dataset(tok, GROUP_PAIRS, 96, use_margin=True)
    assert ds.num_rows == 2 and [len(r) for r in ds["ids"]] == [3, 2]
    batch = collate_groups(tok.pad_token_id)([ds[0], ds[1]])
    assert batch["input_ids"].shape[0] == 5 and batch["attention_mask"].sum(1).min() > 0
    # the pairs come out in input order: the prompt-A pairs first, then prompt B's
    order = [0, 1, 3, 2]
    assert batch["margin"].tolist() == [GROUP_PAIRS[i]["margin"] for i in order]
    for n, i in enumerate(order):
        pair = GROUP_PAIRS[i]
        for side, index in (("chosen", batch["chosen_index"][n]), ("rejected", batch["rejected_index"][n])):
            row = batch["input_ids"][index][batch["attention_mask"][index].bool()].tolist()
            assert row == encode_pairs(tok, [pair["prompt"]], [pair[side]], 96)[0]
    with pytest.raises(UserError, match="margin"):
        build_grouped_dataset(tok, [{"prompt": "p", "chosen": "a", "rejected": "b"}], 96, use_margin=True)


@pytest.mark.parametrize("use_margin,center", [(False, None), (True, 0.01)])
def test_grouped_loss_equals_trl_pairwise_loss(tmp_path, use_margin, center):
    """The same model, the same pairs: the loss of prompt-group batches equals TRL's on pair batches."""
    from trl import RewardConfig, RewardTrainer
    from trl.trainer.reward_trainer import DataCollatorForPreference

    tok = load_tokenizer("tiny-llama", padding_side="right")
    model = load_reward_model("tiny-llama", torch.float32)
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)  # scores that differ, so the loss is not log 2 everywhere
    model.config.pad_token_id = tok.pad_token_id
    args = RewardConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, max_length=None,
                        remove_unused_columns=False, center_rewards_coefficient=center)
    pairwise = build_dataset(tok, GROUP_PAIRS, 96, use_margin)
    grouped = build_grouped_dataset(tok, GROUP_PAIRS, 96, use_margin)
    trl_trainer = RewardTrainer(model=model, args=args, train_dataset=pairwise, processing_class=tok)
    ours = grouped_reward_trainer()(model=model, args=args, train_dataset=grouped, processing_class=tok,
                                    data_collator=collate_groups(tok.pad_token_id))
    model.train()
    expected = trl_trainer.compute_loss(model, DataCollatorForPreference(tok.pad_token_id)(list(pairwise)))
    loss = ours.compute_loss(model, collate_groups(tok.pad_token_id)(list(grouped)))
    assert loss.item() > 0.05 and abs(loss.item() - math.log(2)) > 1e-3
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    assert ours._metrics["train"]["accuracy"] == pytest.approx(trl_trainer._metrics["train"]["accuracy"])
    assert ours._metrics["train"]["margin"] == pytest.approx(trl_trainer._metrics["train"]["margin"], abs=1e-5)


# ---------------------------------------------------------------------------------------------
# a reward model with another tokenizer


def build_other_tokenizer_model(path: Path) -> Path:
    """A tiny GPT-2 whose word-level vocabulary is ordered differently and which has no chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    build_tiny_model(path, arch="gpt2", chat_template=False, seed=1)
    vocab = {tok: i for i, tok in enumerate(SPECIALS + ["user", "assistant", "system", ":"] + WORDS[::-1])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##")
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
                                  eos_token="<eos>")
    tok.save_pretrained(path)
    return path


def test_same_tokenizer():
    llama, gpt2 = load_tokenizer("tiny-llama"), load_tokenizer("tiny-gpt2")
    assert same_tokenizer(llama, gpt2)  # the tiny aliases share one vocabulary
    assert same_tokenizer(llama, load_tokenizer("tiny-llama", padding_side="right"))


def test_reward_model_with_another_tokenizer_through_ppo(tmp_path, data_file):
    backbone = build_other_tokenizer_model(tmp_path / "other-gpt2")
    rm_tok, policy_tok = load_tokenizer(str(backbone), padding_side="right"), load_tokenizer("tiny-llama")
    assert not same_tokenizer(rm_tok, policy_tok)
    assert not rm_tok.chat_template
    # no chat template: "prompt\nresponse<eos>", and the same words get other ids than the policy's
    assert format_for_rm(rm_tok, "write a story", "a good day") == "write a story\na good day<eos>"
    ids = encode_pairs(rm_tok, ["write a story"], ["a good day"], 64)[0]
    assert ids[-1] == rm_tok.eos_token_id and rm_tok.decode(ids, skip_special_tokens=True) == "write a story a good day"
    assert ids[:3] != policy_tok("write a story", add_special_tokens=False)["input_ids"]

    run_dir = tmp_path / "run"
    cfg = cfg_for(run_dir, data_file, f"reward.backbone={backbone}", "ppo.value_model=critic", "ppo.reward=rm",
                  "ppo.num_updates=2", "ppo.batch_size=16", "ppo.mini_batch_size=8", "ppo.save_every=2")
    run_pipeline(cfg, only="prefs")
    run_pipeline(cfg, only="reward")
    assert rm_metrics(run_dir)["test_accuracy"] > 0.8
    saved_rm = load_file(str(run_dir / "reward" / "model" / "model.safetensors"))
    assert any(k.startswith("transformer.h.") for k in saved_rm)  # a GPT-2 reward model
    run_pipeline(cfg, only="ppo")
    assert is_done(cfg, run_dir, "ppo")

    rows = read_jsonl(run_dir / "ppo" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["objective/scores"]) and math.isfinite(r["loss/value_avg"]) for r in rows)
    state = load_file(str(run_dir / "ppo" / "checkpoints" / "step_00002" / "trainable.safetensors"))
    critic = [k for k in state if k.startswith("critic.")]
    # the critic could not start from the GPT-2 RM (other vocabulary): it is the policy's Llama backbone
    assert critic and all(k.startswith(("critic.model.", "critic.score.")) for k in critic)
    assert not any(k.startswith("critic.transformer.") for k in state)
    # the PPO scores are the RM's scores of the decoded samples, re-encoded with the RM's tokenizer
    samples = read_jsonl(run_dir / "ppo" / "samples.jsonl")
    rm = load_reward_model(str(run_dir / "reward" / "model")).eval()
    s = samples[:4]  # the seed prompts are plain strings: the query is the prompt
    expected = score_texts(rm, rm_tok, [x["query"] for x in s], [x["response"] for x in s], cfg.reward.max_length)
    torch.testing.assert_close(torch.tensor([x["score"] for x in s]), expected, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------
# metrics


def test_spearman_hand_values():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [1, 100, 2]) == pytest.approx(0.5)  # ranks (0,1,2) vs (0,2,1): 1 - 6*2/(3*8)
    # ties take average ranks: x ranks (0, 1.5, 1.5, 3), y ranks (0, 1, 2, 3)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    assert math.isnan(spearman([1], [2]))
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))  # no variation


def test_evaluate_pairs_hand_values(monkeypatch):
    def count_good(model, tokenizer, prompts, responses, max_length=512, batch_size=32, normalize=True):
        return torch.tensor([float(r.split().count("good")) for r in responses])

    monkeypatch.setattr(rm_train, "score_texts", count_good)
    pairs = [  # (chosen, rejected, chosen_gold, rejected_gold)
        ("good good", "bad", 2.0, 0.0),  # label right, gold right
        ("bad", "good", 0.0, 1.0),  # a flipped label: RM disagrees with the label, agrees with gold
        ("good", "good good", 1.0, 2.0),  # flipped again
        ("good x", "good y", 1.0, 1.0),  # a gold tie: not counted for gold accuracy; RM tie is not "chosen"
        ("fine", "good", 3.0, 0.0),  # the RM is wrong on both
    ]
    rows = [{"prompt": "p", "chosen": c, "rejected": r, "chosen_gold": gc, "rejected_gold": gr}
            for c, r, gc, gr in pairs]
    m = evaluate_pairs(None, None, rows, max_length=32)
    assert m["pairs"] == 5
    assert m["accuracy"] == pytest.approx(1 / 5)
    assert m["gold_accuracy"] == pytest.approx(3 / 4)
    scores = [2, 0, 1, 1, 0, 0, 1, 2, 1, 1]  # chosen then rejected
    gold = [2, 0, 1, 1, 3, 0, 1, 2, 1, 0]
    assert m["spearman_gold"] == pytest.approx(spearman(scores, gold))
    assert evaluate_pairs(None, None, [], 32) == {}
    no_gold = evaluate_pairs(None, None, [{"prompt": "p", "chosen": "good", "rejected": "bad"}], 32)
    assert no_gold == {"accuracy": 1.0, "pairs": 1}
