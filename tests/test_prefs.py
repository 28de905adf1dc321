"""reward_models/prefs.py: normalising dataset rows, simulated annotators, prompt-disjoint splits, the prefs stage."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest

from reward_models.prefs import label_pairs, load_pairs, normalize_pair, sigmoid, simulate_pairs, split_by_prompt, \
    split_implicit_prompt
from reward_models.judges import get_judge
from rlhf.config import load_config
from rlhf.pipeline import run_pipeline
from rlhf.stages import is_done
from rlhf.utils import UserError, read_jsonl

PROJECT_ROOT = Path(__file__).resolve().parent.parent
TINY = PROJECT_ROOT / "configs" / "tiny.yaml"


def msg(role, content):
    return {"role": role, "content": content}


# ---------------------------------------------------------------------------------------------
# normalize_pair / load_pairs


def test_explicit_prompt():
    pair, why = normalize_pair({"prompt": " write a poem ", "chosen": " roses are red ", "rejected": "no"})
    assert why == ""
    assert pair == {"prompt": "write a poem", "chosen": "roses are red", "rejected": "no"}


def test_explicit_prompt_as_messages():
    prompt = [msg("system", "be nice"), msg("user", "hi")]
    pair, _ = normalize_pair({"prompt": prompt, "chosen": "hello!", "rejected": "go away"})
    assert pair == {"prompt": prompt, "chosen": "hello!", "rejected": "go away"}


def test_conversational_without_prompt_column():
    """hh-rlhf / UltraFeedback style: message lists sharing their prompt turns."""
    shared = [msg("user", "hi"), msg("assistant", "hello"), msg("user", "tell me a joke")]
    row = {"chosen": shared + [msg("assistant", "a funny joke")], "rejected": shared + [msg("assistant", "no")]}
    pair, _ = normalize_pair(row)
    assert pair == {"prompt": shared, "chosen": "a funny joke", "rejected": "no"}


def test_conversational_with_prompt_column():
    """UltraFeedback binarized: a prompt string plus full conversations."""
    row = {"prompt": "tell me a joke", "chosen": [msg("user", "tell me a joke"), msg("assistant", "a joke")],
           "rejected": [msg("user", "tell me a joke"), msg("assistant", "nope")], "score_chosen": 8.0}
    pair, _ = normalize_pair(row)
    assert pair == {"prompt": "tell me a joke", "chosen": "a joke", "rejected": "nope"}


def test_implicit_prompt_hh_style():
    row = {"chosen": "\n\nHuman: hi\n\nAssistant: good", "rejected": "\n\nHuman: hi\n\nAssistant: bad"}
    pair, _ = normalize_pair(row)
    assert pair == {"prompt": "Human: hi\n\nAssistant:", "chosen": "good", "rejected": "bad"}


def test_implicit_prompt_multi_turn_splits_at_last_assistant():
    a = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you\n\nAssistant: great, thanks"
    b = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you\n\nAssistant: grumpy"
    prompt, chosen, rejected = split_implicit_prompt(a, b)
    assert prompt.endswith("how are you\n\nAssistant:")
    assert (chosen, rejected) == ("great, thanks", "grumpy")


def test_implicit_prompt_without_marker_splits_at_a_word():
    prompt, chosen, rejected = split_implicit_prompt("the movie was great", "the movie was grim")
    assert (prompt, chosen, rejected) == ("the movie was ", "great", "grim")


def test_margin_kept_and_checked():
    pair, _ = normalize_pair({"prompt": "p", "chosen": "a", "rejected": "b", "margin": 2})
    assert pair["margin"] == 2.0 and isinstance(pair["margin"], float)
    pair, _ = normalize_pair({"prompt": "p", "chosen": "a", "rejected": "b", "margin": None})
    assert "margin" not in pair


MALFORMED = [
    ({"prompt": "p", "chosen": "a"}, "missing chosen/rejected"),
    ({"prompt": "p", "rejected": "a"}, "missing chosen/rejected"),
    ({"prompt": "p", "chosen": "   ", "rejected": "b"}, "empty text"),
    ({"prompt": "p", "chosen": "a", "rejected": ""}, "empty text"),
    ({"prompt": "  ", "chosen": "a", "rejected": "b"}, "empty prompt"),
    ({"prompt": "p", "chosen": "same", "rejected": " same "}, "identical chosen and rejected"),
    ({"prompt": "p", "chosen": 3, "rejected": "b"}, "wrong types"),
    ({"prompt": "p", "chosen": ["a"], "rejected": ["b"]}, "wrong types"),
    ({"prompt": 5, "chosen": "a", "rejected": "b"}, "wrong types"),
    ({"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}, "wrong types"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}, "non-numeric margin"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "margin": True}, "non-numeric margin"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "margin": float("nan")}, "non-numeric margin"),
    ({"chosen": [msg("user", "x"), msg("assistant", "a")], "rejected": [msg("user", "y"), msg("assistant", "b")]},
     "conversations do not share their prompt turns"),
    ({"chosen": [msg("assistant", "a")], "rejected": [msg("assistant", "b")]},
     "conversations do not share their prompt turns"),
    ({"chosen": [msg("user", "x"), msg("user", "a")], "rejected": [msg("user", "x"), msg("assistant", "b")]},
     "conversation does not end with an assistant turn"),
    # implicit prompt without an Assistant marker: the whole shared text becomes the prompt, nothing is left
    ({"chosen": "same text", "rejected": "same text"}, "empty text"),
    ({"chosen": "\n\nHuman: hi\n\nAssistant: ok", "rejected": "\n\nHuman: hi\n\nAssistant: ok"},
     "identical chosen and rejected"),
]


@pytest.mark.parametrize("row, reason", MALFORMED)
def test_malformed_rows_dropped_with_a_reason(row, reason):
    assert normalize_pair(row) == (None, reason)


def test_load_pairs_counts_dropped_rows():
    good = [{"prompt": "p1", "chosen": "a", "rejected": "b"},
            {"chosen": "\n\nHuman: hi\n\nAssistant: good", "rejected": "\n\nHuman: hi\n\nAssistant: bad"}]
    rows = good + [row for row, _ in MALFORMED] + ["not a dict", None]
    pairs, dropped = load_pairs(rows)
    assert len(pairs) == 2
    expected = Counter(reason for _, reason in MALFORMED)
    expected["not a mapping"] = 2
    assert dropped == expected
    assert sum(dropped.values()) == len(rows) - 2


def test_load_pairs_without_usable_rows_is_a_user_error():
    with pytest.raises(UserError, match=r"my.jsonl: no usable preference pairs \(.*2 empty text"):
        load_pairs([{"prompt": "p", "chosen": "", "rejected": "b"}, {"prompt": "p", "chosen": "a", "rejected": " "},
                    {"prompt": "p"}], source="my.jsonl")
    with pytest.raises(UserError, match="no rows"):
        load_pairs([])


# ---------------------------------------------------------------------------------------------
# simulated annotators


def synthetic(n_prompts=1000, k=3, seed=0):
    """k distinct responses per prompt with distinct gold scores: k(k-1)/2 pairs each."""
    rng = random.Random(seed)
    prompts = [f"prompt {i}" for i in range(n_prompts)]
    responses = [[f"response {i}.{j}" for j in range(k)] for i in range(n_prompts)]
    gold = [[rng.uniform(-1, 1) for _ in range(k)] for _ in range(n_prompts)]
    return prompts, responses, gold


def test_label_pairs_noiseless():
    prompts, responses, gold = synthetic(200)
    pairs, stats = label_pairs(prompts, responses, gold, 0.0, 0.0, 0.0, random.Random(0))
    assert len(pairs) == 600 and stats["pairs_skipped"] == 0
    assert stats["label_gold_agreement"] == 1.0
    for p in pairs:
        assert p["chosen_gold"] > p["rejected_gold"] and p["gold_label_agrees"] is True
        i = prompts.index(p["prompt"])
        assert p["chosen_gold"] == gold[i][responses[i].index(p["chosen"])]
        assert p["rejected_gold"] == gold[i][responses[i].index(p["rejected"])]


def test_label_pairs_flip_rate():
    prompts, responses, gold = synthetic(1000)
    pairs, stats = label_pairs(prompts, responses, gold, 0.0, 0.3, 0.0, random.Random(1))
    assert len(pairs) == 3000
    assert stats["label_gold_agreement"] == pytest.approx(0.7, abs=0.05)
    assert stats["label_gold_agreement"] == pytest.approx(sum(p["gold_label_agrees"] for p in pairs) / 3000)


def test_label_pairs_bradley_terry():
    prompts, responses, gold = synthetic(1000)
    _, hot = label_pairs(prompts, responses, gold, 1e6, 0.0, 0.0, random.Random(2))
    assert hot["label_gold_agreement"] == pytest.approx(0.5, abs=0.05)
    _, warm = label_pairs(prompts, responses, gold, 0.3, 0.0, 0.0, random.Random(2))
    assert 0.6 < warm["label_gold_agreement"] < 0.95  # noisy, but better than chance


def test_label_pairs_tiny_temperature_does_not_overflow():
    # gold gaps of ~2 at T=0.001 put e^(2000) in a naive sigmoid: an OverflowError after all the sampling
    prompts, responses, gold = synthetic(100)
    pairs, stats = label_pairs(prompts, responses, gold, 1e-3, 0.0, 0.0, random.Random(3))
    assert len(pairs) == 300 and stats["label_gold_agreement"] == pytest.approx(1.0, abs=0.02)
    assert sigmoid(-1e6) == 0.0 and sigmoid(1e6) == 1.0 and sigmoid(0.0) == 0.5


def test_label_pairs_is_seeded():
    prompts, responses, gold = synthetic(100)
    a, _ = label_pairs(prompts, responses, gold, 0.5, 0.2, 0.0, random.Random(7))
    b, _ = label_pairs(prompts, responses, gold, 0.5, 0.2, 0.0, random.Random(7))
    assert a == b


def test_label_pairs_skips_ties_small_gaps_and_empty():
    prompts = ["p"]
    responses = [["a", "b", "a", "", "c"]]
    gold = [[0.0, 1.0, 0.0, 5.0, 1.05]]
    pairs, stats = label_pairs(prompts, responses, gold, 0.0, 0.0, 0.5, random.Random(0))
    kept = {(p["chosen"], p["rejected"]) for p in pairs}
    assert kept == {("b", "a"), ("c", "a")}
    assert len(pairs) == 4  # b and c against each of the two "a"s; b-c is a small gap, "" and a-a are skipped
    assert stats["pairs_skipped"] == 10 - 4


def test_label_pairs_equal_gold_is_undecided():
    pairs, stats = label_pairs(["p"], [["x", "y"]], [[1.0, 1.0]], 0.0, 0.0, 0.0, random.Random(0))
    assert len(pairs) == 1 and pairs[0]["gold_label_agrees"] is None
    assert stats["label_gold_agreement"] != stats["label_gold_agreement"]  # NaN: nothing decided


# ---------------------------------------------------------------------------------------------
# splits


def test_split_by_prompt_keeps_prompts_disjoint():
    conv = [msg("user", "hi")]
    pairs = [{"prompt": f"p{i % 37}", "chosen": f"a{i}", "rejected": f"b{i}"} for i in range(300)]
    pairs += [{"prompt": conv, "chosen": f"c{i}", "rejected": f"d{i}"} for i in range(5)]
    train, test = split_by_prompt(pairs, 0.2, seed=0)
    key = lambda p: repr(p["prompt"])  # noqa: E731
    assert {key(p) for p in train}.isdisjoint({key(p) for p in test})
    assert len(train) + len(test) == len(pairs)
    assert len({key(p) for p in test}) == round(38 * 0.2)
    again = split_by_prompt(pairs, 0.2, seed=0)
    assert again == (train, test)
    other = split_by_prompt(pairs, 0.2, seed=1)
    assert other != (train, test)


def test_split_by_prompt_single_prompt_has_no_test():
    pairs = [{"prompt": "same", "chosen": f"a{i}", "rejected": f"b{i}"} for i in range(5)]
    train, test = split_by_prompt(pairs, 0.1, seed=0)
    assert len(train) == 5 and test == []


# ---------------------------------------------------------------------------------------------
# stages


def test_simulate_pairs_on_tiny_llama(tmp_path):
    cfg = load_config(TINY, [f"run.output_dir={tmp_path}", "tracking.wandb=off", "prefs.num_prompts=6",
                             "prefs.responses_per_prompt=3", "prefs.min_gold_gap=0", "prefs.judge=keyword:the",
                             "prefs.max_new_tokens=12"])
    pairs, stats = simulate_pairs(cfg, progress=False)
    assert stats["prompts"] == 6 and stats["responses"] == 18
    assert len(pairs) + stats["pairs_skipped"] == 6 * 3
    judge = get_judge("keyword:the")
    for p in pairs:
        assert {"prompt", "chosen", "rejected", "chosen_gold", "rejected_gold", "gold_label_agrees"} <= set(p)
        assert p["chosen_gold"] == judge([p["chosen"]])[0] and p["rejected_gold"] == judge([p["rejected"]])[0]
        if p["chosen_gold"] != p["rejected_gold"]:
            assert p["chosen_gold"] > p["rejected_gold"]  # noiseless annotators by default
    again, _ = simulate_pairs(cfg, progress=False)
    assert again == pairs  # seeded


def write_jsonl(path: Path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_prefs_stage_loads_a_local_jsonl(tmp_path):
    data = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"write about the {w}", "chosen": f"a good {w}", "rejected": f"a bad {w}", "margin": 1.0}
            for w in ["dog", "cat", "car", "park", "city", "train", "book", "movie", "food", "music"]]
    rows += [{"prompt": "p", "chosen": "x", "rejected": "x"}, {"prompt": "p", "chosen": "", "rejected": "y"}]
    write_jsonl(data, rows)
    run_dir = tmp_path / "run"
    cfg = load_config(TINY, [f"run.output_dir={run_dir}", "tracking.wandb=off", "prefs.source=load",
                             f"prefs.dataset={data}", "prefs.test_fraction=0.2"])
    run_pipeline(cfg, only="prefs")
    assert is_done(cfg, run_dir, "prefs")
    train, test = read_jsonl(run_dir / "prefs" / "train.jsonl"), read_jsonl(run_dir / "prefs" / "test.jsonl")
    assert len(train) == 8 and len(test) == 2
    assert {p["prompt"] for p in train}.isdisjoint({p["prompt"] for p in test})
    assert all(p["margin"] == 1.0 and p["chosen"].startswith("a good") for p in train + test)
    stats = json.loads((run_dir / "prefs" / "stats.json").read_text())
    assert stats["rows_dropped"] == {"identical chosen and rejected": 1, "empty text": 1}
    assert stats["rows_dropped_total"] == 2
    assert stats["pairs_train"] == 8 and stats["pairs_test"] == 2 and stats["source"] == "load"
    assert (run_dir / "prefs" / "metrics.jsonl").is_file()


def test_prefs_stage_with_no_usable_rows_fails_cleanly(tmp_path):
    data = tmp_path / "bad.jsonl"
    write_jsonl(data, [{"prompt": "p", "chosen": "same", "rejected": "same"}])
    run_dir = tmp_path / "run"
    cfg = load_config(TINY, [f"run.output_dir={run_dir}", "tracking.wandb=off", "prefs.source=load",
                             f"prefs.dataset={data}"])
    with pytest.raises(UserError, match="no usable preference pairs"):
        run_pipeline(cfg, only="prefs")
    assert not is_done(cfg, run_dir, "prefs")
    assert not (run_dir / "prefs" / "train.jsonl").exists()


def test_prefs_stage_missing_file_is_a_user_error(tmp_path):
    cfg = load_config(TINY, [f"run.output_dir={tmp_path / 'run'}", "tracking.wandb=off", "prefs.source=load",
                             f"prefs.dataset={tmp_path / 'nope.jsonl'}"])
    with pytest.raises(UserError, match="not found"):
        run_pipeline(cfg, only="prefs")
