"""The hub recipe (configs/qwen2.5-0.5b-hh.yaml) checked offline: its hub names replaced by local fixtures
of the same format (a tiny Qwen2 folder, hh-rlhf rows, TRL-style prompt rows), the up-front checks
and the prefs stage run on it; without the hub, the CLI stops with one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from reward_models.prefs import run_prefs
from rlhf.config import load_config
from rlhf.preflight import preflight
from rlhf.utils import read_jsonl

PROJECT_ROOT = Path(__file__).resolve().parent.parent
RECIPE = PROJECT_ROOT / "configs" / "qwen2.5-0.5b-hh.yaml"
STAGES = ["prefs", "reward", "ppo", "eval"]

# Anthropic/hh-rlhf rows: one text per side, the conversation so far then the last answer.
HH_ROWS = [
    {"chosen": f"\n\nHuman: tell me about the {thing}\n\nAssistant: the {thing} is good and nice",
     "rejected": f"\n\nHuman: tell me about the {thing}\n\nAssistant: bad"}
    for thing in ("dog", "cat", "city", "movie", "book", "game", "car", "park", "coffee", "music")
] + [
    {"chosen": f"\n\nHuman: i like the {thing}\n\nAssistant: you like it ?\n\nHuman: yes\n\nAssistant: great , "
               f"enjoy the {thing} today",
     "rejected": f"\n\nHuman: i like the {thing}\n\nAssistant: you like it ?\n\nHuman: yes\n\nAssistant: so"}
    for thing in ("train", "team", "trip", "food", "sun")
]


def hub_names(cfg) -> dict[str, str]:
    """Dotted key -> value of every config string naming a hub repository (owner/name, not a local path)."""
    names = {}

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            elif isinstance(value, str) and value.count("/") == 1 and not Path(value).exists() \
                    and not value.startswith((".", "/", "~", "runs/", "seeds/")):
                names[f"{prefix}{key}"] = value
    walk(cfg.to_dict(), "")
    return names


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    """Local stand-ins, same formats as the hub's: model folder, hh-rlhf JSONL, TRL-style prompt Parquet."""
    import datasets

    from rlhf.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("hub")
    model = build_tiny_model(root / "Qwen2.5-0.5B-Instruct", arch="qwen2")
    hh = root / "hh-rlhf.jsonl"
    hh.write_text("".join(json.dumps(row) + "\n" for row in HH_ROWS))
    prompts = root / "hh-rlhf-helpful-base.parquet"  # as many prompts as one PPO batch of the recipe
    words = [f"{a} {b}" for a in ("good", "bad", "nice", "great", "sad", "happy", "awful", "fine")
             for b in ("dog", "cat", "rain", "sun", "city", "movie", "book", "game")]
    datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": f"tell me about the {w}"}]}
                                for w in words]).to_parquet(str(prompts))
    return {"Qwen/Qwen2.5-0.5B-Instruct": str(model), "Anthropic/hh-rlhf": str(hh),
            "trl-lib/hh-rlhf-helpful-base": str(prompts)}


def local_recipe(fixtures, run_dir: Path):
    cfg = load_config(RECIPE)
    names = hub_names(cfg)
    assert set(names.values()) == set(fixtures), names  # every hub name has a stand-in, and only those
    return load_config(RECIPE, [f"{k}={fixtures[v]}" for k, v in names.items()] + [f"run.output_dir={run_dir}"])


def test_recipe_names_the_hub_models_and_data():
    cfg = load_config(RECIPE)
    assert (cfg.model.policy, cfg.prefs.dataset) == ("Qwen/Qwen2.5-0.5B-Instruct", "Anthropic/hh-rlhf")
    assert cfg.prefs.source == "load" and cfg.ppo.lora and cfg.model.dtype == "bfloat16"
    assert cfg.reward.backbone is None  # the RM (and so the critic) starts from the policy


def test_recipe_passes_the_up_front_checks_on_local_stand_ins(fixtures, tmp_path):
    preflight(local_recipe(fixtures, tmp_path / "run"), STAGES)


def test_prefs_split_the_hh_prompts(fixtures, tmp_path):
    cfg = local_recipe(fixtures, tmp_path / "run")
    out = run_prefs(cfg, tmp_path / "run", tmp_path / "prefs")
    pairs = read_jsonl(out / "train.jsonl") + read_jsonl(out / "test.jsonl")
    assert len(pairs) == len(HH_ROWS) and read_jsonl(out / "test.jsonl")
    by_prompt = {p["prompt"]: p for p in pairs}
    one = by_prompt["Human: tell me about the dog\n\nAssistant:"]
    assert (one["chosen"], one["rejected"]) == ("the dog is good and nice", "bad")
    multi = by_prompt["Human: i like the trip\n\nAssistant: you like it ?\n\nHuman: yes\n\nAssistant:"]
    assert (multi["chosen"], multi["rejected"]) == ("great , enjoy the trip today", "so")


@pytest.mark.parametrize("keep_hub", ["trl-lib/hh-rlhf-helpful-base", "Qwen/Qwen2.5-0.5B-Instruct"])
def test_cli_without_the_hub_stops_with_one_line(fixtures, tmp_path, keep_hub):
    """HF_HUB_OFFLINE (set for the whole session by conftest) stands for a hub that cannot be reached."""
    cfg = load_config(RECIPE)
    replaced = [f"{k}={fixtures[v]}" for k, v in hub_names(cfg).items() if v != keep_hub]
    proc = subprocess.run([sys.executable, "-m", "rlhf.cli", "run", str(RECIPE), f"run.output_dir={tmp_path / 'run'}",
                           *replaced], capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and keep_hub in lines[0], proc.stderr
    assert not (tmp_path / "run").exists()
