"""The eval report, `rlhf inspect` and the eval helpers (the inspection notebook: tests/test_readme.py).

Fast tests use small hand-made run directories; the rest use the real tiny run made once per
session by the `tiny_run_dir` fixture (tests/conftest.py).
"""

from __future__ import annotations

import base64
import html.parser
import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from rlhf.evaluate import (METRICS, best_of_n_kl, best_of_n_log_n_at_kl, best_of_n_picks, best_of_n_point,
                           bon_gold_at_kl, bon_metrics, distinct_n, win_rate)
from rlhf.utils import UserError, atomic_write_json, write_jsonl

PROJECT_ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------
# eval helpers, by hand


def test_distinct_n_by_hand():
    assert distinct_n(["a b a b"], 1) == pytest.approx(2 / 4)
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)  # (a b), (b a), (a b)
    assert distinct_n(["a b", "a b"], 2) == pytest.approx(1 / 2)  # counted over all texts together
    assert distinct_n(["a b c", "d"], 2) == pytest.approx(2 / 2)  # "d" has no bigram
    assert distinct_n(["x"], 2) == 0.0 and distinct_n([], 1) == 0.0


def test_win_rate_by_hand():
    rate, (lo, hi) = win_rate([3.0, 1.0, 2.0, 5.0], [1.0, 1.0, 3.0, 0.0], samples=500, seed=0)
    assert rate == pytest.approx((1 + 0.5 + 0 + 1) / 4)  # a tie counts 1/2
    assert 0.0 <= lo <= rate <= hi <= 1.0 and lo < hi
    assert win_rate([3.0, 1.0, 2.0, 5.0], [1.0, 1.0, 3.0, 0.0], samples=500, seed=0) == (rate, [lo, hi])
    assert win_rate([2.0, 2.0], [1.0, 0.0], samples=50, seed=1) == (1.0, [1.0, 1.0])
    assert win_rate([1.0], [1.0], samples=10, seed=0) == (0.5, [0.5, 0.5])


def test_best_of_n_kl_by_hand():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(2) == pytest.approx(0.693147 - 0.5, abs=1e-6)
    assert best_of_n_kl(4) == pytest.approx(1.386294 - 0.75, abs=1e-6)
    assert best_of_n_kl(16) == pytest.approx(2.772589 - 0.9375, abs=1e-6)  # 1.84, as issue 17 measured
    for n in (1.5, 2, 4, 16, 2100, 1e9):  # the inverse
        assert best_of_n_log_n_at_kl(best_of_n_kl(n)) == pytest.approx(math.log(n), rel=1e-9)
    assert best_of_n_log_n_at_kl(0.0) == 0.0 and best_of_n_log_n_at_kl(-0.3) == 0.0  # k1 can dip below 0


def test_best_of_n_picks_by_hand():
    scores = [0.1, 0.5, 0.3, 0.3, 0.9, 0.2, 0.4]
    assert best_of_n_picks(scores, 1) == [0, 1, 2, 3, 4, 5, 6]
    assert best_of_n_picks(scores, 2) == [1, 2, 4]  # [0, 1] [2, 3] (a tie: the earlier) [4, 5]; 6 left out
    assert best_of_n_picks(scores, 3) == [1, 4]  # [0, 1, 2] [3, 4, 5]
    assert best_of_n_picks(scores, 7) == [4] and best_of_n_picks(scores, 8) == []


def test_best_of_n_point_by_hand():
    scores = [[0.0, 2.0, 1.0, 3.0], [5.0, 4.0, 7.0, 6.0]]
    golds = [[1.0, 0.0, 0.0, 2.0], [0.0, 1.0, 1.0, 0.0]]
    one, two, four = (best_of_n_point(scores, golds, n) for n in (1, 2, 4))
    assert one == {"method": "best_of_n", "n": 1, "kl": 0.0, "score": 28 / 8, "gold": 5 / 8}  # every sample
    # picks: prompt 0 samples 1 and 3, prompt 1 samples 0 and 2 (by score, not by gold)
    assert two == {"method": "best_of_n", "n": 2, "kl": best_of_n_kl(2), "score": (2 + 3 + 5 + 7) / 4,
                   "gold": (0 + 2 + 0 + 1) / 4}
    assert (four["score"], four["gold"]) == ((3 + 7) / 2, (2 + 1) / 2)
    assert best_of_n_point(scores, None, 2)["gold"] is None


def test_bon_gold_at_kl_by_hand():
    points = [{"n": n, "kl": best_of_n_kl(n), "gold": g} for n, g in ((16, 0.8), (1, 0.0), (4, 0.6))]
    assert bon_gold_at_kl(points, best_of_n_kl(2)) == (pytest.approx(0.3), False)  # log 2 halfway 1 -> 4
    assert bon_gold_at_kl(points, best_of_n_kl(8)) == (pytest.approx(0.7), False)  # log 8 halfway 4 -> 16
    assert bon_gold_at_kl(points, best_of_n_kl(4)) == (pytest.approx(0.6), False)
    assert bon_gold_at_kl(points, best_of_n_kl(16)) == (0.8, False)  # the edge is still measured
    assert bon_gold_at_kl(points, 6.67) == (0.8, True)  # beyond best-of-16: its gold, flagged
    assert bon_gold_at_kl(points, -0.05) == (0.0, False)
    assert bon_gold_at_kl([points[0], points[2]], 0.1) == (0.6, False)  # below the smallest n (4): its gold
    frontier = [{"method": "best_of_n", **p} for p in points] + [{"method": "ppo", "step": 3, "kl": 9.0, "gold": 2}]
    assert bon_metrics(frontier, best_of_n_kl(8)) == {"bon_gold_at_policy_kl": pytest.approx(0.7),
                                                      "bon_policy_kl_beyond_range": False}
    assert bon_metrics([{**p, "gold": None} for p in frontier], 1.0) == {}  # no gold judge


# ---------------------------------------------------------------------------------------------
# a hand-made run directory (no models)


def make_run(root: Path, n: int = 23, gold: bool = True, ppo: bool = True, frontier: bool = True) -> Path:
    run = root / "run"
    rows = []
    for i in range(n):
        rows.append({
            "prompt": f"Prompt {i}: tell me about <b>tag</b> & {'Apples' if i % 3 == 0 else 'pears'}",
            "ref_response": f"ref answer {i} [bold]not markup[/bold]",
            "policy_response": f"policy answer {i} good" + (" apples" if i % 5 == 0 else ""),
            "ref_score": 0.0, "policy_score": float(i % 7) - 3,
            "ref_gold": 0.0 if gold else None, "policy_gold": (float(i % 4) - 1.5) if gold else None,
            "kl": float(i), "ref_length": 10, "policy_length": 12,
        })
    write_jsonl(run / "eval" / "generations.jsonl", rows)
    metrics = {"num_prompts": n, "policy_score": 0.1, "ref_score": 0.0, "kl": 3.2, "win_rate_rm": 0.6,
               "win_rate_rm_ci": [0.4, 0.8], "policy_length": 12.0, "ref_length": 10.0}
    if gold:
        metrics.update(policy_gold=0.2, ref_gold=0.0, gold_gain=0.2, win_rate_gold=0.55, win_rate_gold_ci=[0.3, 0.7])
    if frontier:
        write_jsonl(run / "eval" / "frontier.jsonl", [
            *({"method": "best_of_n", "n": k, "kl": best_of_n_kl(k), "score": 0.1 * k,
               "gold": 0.04 * k if gold else None} for k in (1, 2, 4)),
            *({"method": "ppo", "step": s, "kl": 1.1 * s, "score": 0.05 * s, "gold": 0.1 * s - 0.3 if gold else None}
              for s in (2, 4))])
        if gold:
            metrics.update(bon_gold_at_policy_kl=0.16, bon_policy_kl_beyond_range=True)
    atomic_write_json(run / "eval" / "metrics.json", metrics)
    (run / "config.yaml").write_text("run:\n  name: hand-made\n")
    if ppo:
        write_jsonl(run / "ppo" / "metrics.jsonl", [
            {"step": s, "objective/kl": 0.5 * s, "objective/scores": 0.1 * s, "val/response_length": 10 + s,
             **({"objective/gold": 0.05 * s} if gold else {})} for s in range(1, 16)])
        write_jsonl(run / "ppo" / "samples.jsonl", [
            {"step": s, "query": f"query {s}.{j}", "response": f"response {s}.{j}", "score": float(j), "kl": 0.1 * j,
             "gold": float(j % 2) if gold else None, "reward": float(j)} for s in (1, 10) for j in range(5)])
    return run


class ReportParser(html.parser.HTMLParser):
    """Collects tags, image sources and text, and checks that tables/divs are closed."""

    def __init__(self):
        super().__init__()
        self.stack: list[str] = []
        self.tags: Counter = Counter()
        self.images: list[str] = []
        self.links: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags[tag] += 1
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        for key in ("src", "href"):
            if key in attrs and tag != "img":
                self.links.append(attrs[key])
        if tag in ("table", "div", "tr", "td", "th", "html", "body", "head", "details", "pre"):
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag in ("table", "div", "tr", "td", "th", "html", "body", "head", "details", "pre"):
            assert self.stack and self.stack[-1] == tag, (tag, self.stack[-5:])
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def parse_report(path: Path) -> ReportParser:
    parser = ReportParser()
    parser.feed(path.read_text())
    parser.close()
    assert parser.stack == [], parser.stack
    return parser


def check_self_contained(parser: ReportParser, n_images: int) -> None:
    assert parser.tags["script"] == 0 and parser.tags["link"] == 0  # no external JS/CSS
    assert parser.links == []
    assert len(parser.images) == n_images
    for src in parser.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_hand_made_run_escapes_and_embeds(tmp_path):
    from rlhf.report import write_report

    run = make_run(tmp_path)
    path = write_report(run)
    assert path == run / "eval" / "report.html"
    for png in ("curves.png", "length.png", "frontier.png"):
        assert (run / "eval" / png).read_bytes()[:4] == b"\x89PNG"
    parser = parse_report(path)
    check_self_contained(parser, n_images=3)
    text = "".join(parser.text)
    assert "hand-made" in text
    # the frontier's sentence: beyond best-of-4 (KL 0.64), PPO's gold 0.2 against 0.16; log 66 - 65/66 = 3.2
    assert ("The PPO policy's KL of 3.2 nats is beyond the largest n sampled: best-of-4 reaches gold 0.16 at "
            "0.636 nats, the PPO policy 0.2 (ahead by 0.04), and best-of-n would need n ≈ 66 to spend the same "
            "KL.") in text
    assert "<b>tag</b>" in text and parser.tags["b"] == 10  # prompt HTML is escaped; 10 "#i" labels are <b>
    assert "&lt;b&gt;tag" in path.read_text()
    for key in json.loads((run / "eval" / "metrics.json").read_text()):
        assert key in text and METRICS[key] in text
    assert "no gold" not in text and "skipped" not in text


def test_report_without_ppo_metrics_or_gold(tmp_path):
    from rlhf.report import write_report

    run = make_run(tmp_path, gold=False, ppo=False)
    text = "".join(parse_report(write_report(run)).text)
    assert "no PPO metrics" in text
    assert (run / "eval" / "curves.png").is_file()

    run2 = make_run(tmp_path / "b", gold=False, ppo=True)
    parser = parse_report(write_report(run2))
    check_self_contained(parser, n_images=3)
    text = "".join(parser.text)
    assert "no gold score in the PPO metrics" in text
    assert "no gold scores in eval/frontier.jsonl" in text and "beyond the largest n" not in text


def test_report_without_frontier(tmp_path):
    from rlhf.report import write_report

    run = make_run(tmp_path, frontier=False)
    (run / "eval" / "frontier.png").write_bytes(b"an earlier run's")
    parser = parse_report(write_report(run))
    check_self_contained(parser, n_images=2)
    assert "no eval/frontier.jsonl (eval.best_of_n empty or greedy decoding)" in "".join(parser.text)
    assert not (run / "eval" / "frontier.png").exists()


def test_draw_frontier_panels_and_path(tmp_path):
    from rlhf.report import draw_frontier, new_figure

    rows = [{"method": "best_of_n", "n": n, "kl": best_of_n_kl(n), "score": 0.1 * n, "gold": 0.05 * n}
            for n in (1, 2, 4, 8)]
    rows += [{"method": "ppo", "step": s, "kl": 2.0 * s, "score": 0.3 * s, "gold": 0.4 - 0.05 * s} for s in (3, 1, 2)]
    fig = new_figure(11, 4)
    assert draw_frontier(fig, rows) == []
    gold_ax, rm_ax = fig.axes
    assert gold_ax.get_title() == "gold score against KL" and rm_ax.get_title() == "RM score against KL"
    bon_line, ppo_path = gold_ax.get_lines()
    assert list(bon_line.get_xdata()) == [best_of_n_kl(n) for n in (1, 2, 4, 8)]
    assert list(ppo_path.get_xdata()) == [2.0, 4.0, 6.0]  # PPO's path in update order
    assert list(ppo_path.get_ydata()) == pytest.approx([0.35, 0.3, 0.25])
    assert list(rm_ax.get_lines()[1].get_ydata()) == pytest.approx([0.3, 0.6, 0.9])  # RM up, gold down
    assert [t.get_text() for t in gold_ax.texts] == ["n=1", "n=2", "n=4", "n=8", "1", "2"]
    no_gold = new_figure(11, 4)
    assert draw_frontier(no_gold, [{**r, "gold": None} for r in rows]) == [
        "no gold scores in eval/frontier.jsonl (no gold judge configured): RM score only"]
    assert [ax.get_title() for ax in no_gold.axes] == ["RM score against KL"]


def test_report_of_the_tiny_run(tiny_run_dir):
    from rlhf.report import frontier_sentence
    from rlhf.utils import read_jsonl

    path = tiny_run_dir / "eval" / "report.html"
    parser = parse_report(path)
    check_self_contained(parser, n_images=3)
    text = " ".join(" ".join(parser.text).split())
    assert "RLHF report: tiny" in text
    metrics = json.loads((tiny_run_dir / "eval" / "metrics.json").read_text())
    for key in metrics:
        assert key in text and " ".join(METRICS[key].split()) in text
    first = json.loads((tiny_run_dir / "eval" / "generations.jsonl").read_text().splitlines()[0])
    assert " ".join(first["prompt"].split()) in text  # the sample starts at row 0
    assert parser.tags["tr"] >= len(metrics) + 1 + 10  # metrics table and 10 sample rows (+ headers)
    for png in ("curves.png", "length.png", "frontier.png"):
        assert (tiny_run_dir / "eval" / png).stat().st_size > 10_000
    assert "PPO against best-of-n (gold vs KL)" in text
    sentence = frontier_sentence(read_jsonl(tiny_run_dir / "eval" / "frontier.jsonl"), metrics)
    assert "the PPO policy" in sentence and sentence in text


def test_frontier_sentence_within_and_without_gold():
    from rlhf.report import frontier_sentence

    rows = [{"method": "best_of_n", "n": n, "kl": best_of_n_kl(n), "gold": g}
            for n, g in ((1, 0.0), (4, 0.6), (16, 0.8))]
    metrics = {"kl": best_of_n_kl(8), "policy_gold": 0.65, "bon_gold_at_policy_kl": 0.7,
               "bon_policy_kl_beyond_range": False}
    assert frontier_sentence(rows, metrics) == (
        "At its KL of 1.2 nats the PPO policy reaches gold 0.65; best-of-n from the reference reaches 0.7 at the "
        "same KL (n ≈ 8, interpolated in log n): PPO is behind by 0.05.")
    assert frontier_sentence(rows, {**metrics, "policy_gold": 0.7}).endswith("PPO is level.")
    assert frontier_sentence(rows, {**metrics, "kl_se": 0.134}).startswith("At its KL of 1.2 ± 0.13 nats the PPO")
    assert frontier_sentence(rows, {"kl": 1.0, "policy_gold": 0.5}) == ""  # no bon_gold_at_policy_kl: no gold


# ---------------------------------------------------------------------------------------------
# the frontier of the tiny run


def test_frontier_of_the_tiny_run(tiny_run_dir):
    """Best-of-n rows for n = 1 and each of eval.best_of_n with the analytical KL, one PPO row (the final
    policy), and picks made by the run's reward model on the samples of eval/best_of_n.jsonl."""
    import torch
    import yaml

    from rlhf.utils import read_jsonl

    cfg = yaml.safe_load((tiny_run_dir / "config.yaml").read_text())
    ns = sorted({1, *cfg["eval"]["best_of_n"]})
    assert len(ns) >= 3
    metrics = json.loads((tiny_run_dir / "eval" / "metrics.json").read_text())
    frontier = read_jsonl(tiny_run_dir / "eval" / "frontier.jsonl")
    bon = [r for r in frontier if r["method"] == "best_of_n"]
    assert [r["n"] for r in bon] == ns  # n = 1 first, then increasing
    for r in bon:
        assert set(r) == {"method", "n", "kl", "score", "gold"}
        assert r["kl"] == pytest.approx(math.log(r["n"]) - (r["n"] - 1) / r["n"], abs=1e-12)
    assert frontier[len(bon):] == [{"method": "ppo", "step": cfg["ppo"]["num_updates"], "kl": metrics["kl"],
                                    "score": metrics["policy_score"], "gold": metrics["policy_gold"]}]

    # the samples: max(n) per prompt, the first of them the reference's eval answer
    samples = read_jsonl(tiny_run_dir / "eval" / "best_of_n.jsonl")
    generations = read_jsonl(tiny_run_dir / "eval" / "generations.jsonl")
    assert len(samples) == len(generations)
    for s, g in zip(samples, generations):
        assert s["prompt"] == g["prompt"] and len(s["responses"]) == len(s["scores"]) == len(s["golds"]) == ns[-1]
        assert (s["responses"][0], s["scores"][0], s["golds"][0]) == (g["ref_response"], g["ref_score"], g["ref_gold"])
    extra = [(s["prompt"], r, score) for s in samples for r, score in zip(s["responses"][1:], s["scores"][1:])]
    assert sum(r != s["responses"][0] for s in samples for r in s["responses"][1:]) > len(extra) / 2  # new draws

    # the stored scores are the reward model's ...
    from reward_models.model import score_texts
    from rlhf.models import load_reward_model, load_tokenizer

    reward_dir = str(tiny_run_dir / "reward" / "model")
    rm, tok = load_reward_model(reward_dir, torch.float32).eval(), load_tokenizer(reward_dir, padding_side="right")
    rescored = score_texts(rm, tok, [e[0] for e in extra[:40]], [e[1] for e in extra[:40]], cfg["reward"]["max_length"])
    assert rescored.tolist() == pytest.approx([e[2] for e in extra[:40]], abs=1e-4)
    # ... and each n's row is the mean over the highest-scoring sample of each disjoint group of n
    for row in bon:
        n = row["n"]
        picks = [(s, max(range(k, k + n), key=lambda j: s["scores"][j])) for s in samples
                 for k in range(0, ns[-1] - n + 1, n)]
        assert row["score"] == pytest.approx(sum(s["scores"][j] for s, j in picks) / len(picks))
        assert row["gold"] == pytest.approx(sum(s["golds"][j] for s, j in picks) / len(picks))
    scores = [r["score"] for r in bon]
    assert scores == sorted(scores)  # groups of 1, 2, 4 nest: a bigger group's best is never worse
    assert bon[-1]["gold"] > bon[0]["gold"]  # the reward model learned the keyword: its picks say it more

    gold, beyond = bon_gold_at_kl(bon, metrics["kl"])
    assert metrics["bon_gold_at_policy_kl"] == gold
    assert metrics["bon_policy_kl_beyond_range"] is beyond is (metrics["kl"] > bon[-1]["kl"])


def test_eval_without_best_of_n_has_the_same_answers(tiny_run_dir, tmp_path):
    """eval.best_of_n=[]: the same generations and metrics (the best-of-n keys aside) as with it, since
    its samples draw from a random stream of their own; the earlier frontier files are removed."""
    import shutil

    from rlhf.config import load_config
    from rlhf.pipeline import run_pipeline

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run_dir, run_dir)
    cfg = load_config(PROJECT_ROOT / "configs" / "tiny.yaml", [f"run.output_dir={run_dir}", "run.device=cpu",
                                                               "eval.best_of_n=[]"])
    run_pipeline(cfg, only="eval")
    with_bon = json.loads((tiny_run_dir / "eval" / "metrics.json").read_text())
    without = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert without == {k: v for k, v in with_bon.items() if not k.startswith("bon_")} != with_bon
    generations = [d / "eval" / "generations.jsonl" for d in (run_dir, tiny_run_dir)]
    assert generations[0].read_text() == generations[1].read_text()
    for name in ("frontier.jsonl", "best_of_n.jsonl", "frontier.png"):
        assert not (run_dir / "eval" / name).exists()
    parser = parse_report(run_dir / "eval" / "report.html")
    check_self_contained(parser, n_images=2)
    assert "best-of-n comparison skipped" in "".join(parser.text)


# ---------------------------------------------------------------------------------------------
# rlhf.inspect on the hand-made run


def shown(run: Path, **kwargs) -> str:
    from rich.console import Console

    from rlhf.inspect import show_generations

    console = Console(record=True, width=300, color_system=None)
    show_generations(run, console=console, **kwargs)
    return console.export_text()


def shown_indices(text: str) -> list[int]:
    return [int(line.split()[0][1:]) for line in text.splitlines() if line.startswith("#")]


@pytest.mark.parametrize("sort, key, descending", [
    ("gold_diff", lambda r: r["policy_gold"] - r["ref_gold"], True),
    ("-gold_diff", lambda r: r["policy_gold"] - r["ref_gold"], False),
    ("score_diff", lambda r: r["policy_score"] - r["ref_score"], True),
    ("-score_diff", lambda r: r["policy_score"] - r["ref_score"], False),
    ("kl", lambda r: r["kl"], True),
    ("-kl", lambda r: r["kl"], False),
])
def test_show_generations_sorts(tmp_path, sort, key, descending):
    from rlhf.utils import read_jsonl

    run = make_run(tmp_path)
    rows = read_jsonl(run / "eval" / "generations.jsonl")
    indices = shown_indices(shown(run, n=100, sort=sort))
    assert sorted(indices) == list(range(len(rows)))
    values = [key(rows[i]) for i in indices]
    assert values == sorted(values, reverse=descending)
    # ties keep file order
    for a, b in zip(indices, indices[1:]):
        if key(rows[a]) == key(rows[b]):
            assert a < b


def test_show_generations_filter_page_footer(tmp_path):
    run = make_run(tmp_path)
    everything = shown(run, n=10, sort="index")
    assert shown_indices(everything) == list(range(10))
    assert "page 1/3, rows 1-10 of 23; next: --page 2" in everything
    assert "[bold]not markup[/bold]" in everything  # model text is never read as rich markup
    last = shown(run, n=10, sort="index", page=3)
    assert shown_indices(last) == [20, 21, 22] and "page 3/3, rows 21-23 of 23; last page" in last
    # "apples": prompts 0,3,6,...(Apples) or policy responses 0,5,10,...; case-insensitive
    expected = sorted({i for i in range(23) if i % 3 == 0 or i % 5 == 0})
    found = shown(run, n=100, sort="index", contains="APPLES")
    assert shown_indices(found) == expected
    page2 = shown(run, n=4, sort="index", contains="apples", page=2)
    assert shown_indices(page2) == expected[4:8]
    assert f"page 2/{-(-len(expected) // 4)}, rows 5-8 of {len(expected)}; next: --page 3" in page2
    assert "no generations contain" in shown(run, contains="zebra")
    with pytest.raises(UserError, match="page 9 does not exist"):
        shown(run, page=9)


def test_show_generations_without_gold_sorts_by_rm(tmp_path):
    run = make_run(tmp_path, gold=False)
    text = shown(run, n=100)
    assert "no gold scores" in text
    from rlhf.utils import read_jsonl

    rows = read_jsonl(run / "eval" / "generations.jsonl")
    values = [rows[i]["policy_score"] for i in shown_indices(text)]
    assert values == sorted(values, reverse=True)


def test_show_samples_of_a_step(tmp_path):
    run = make_run(tmp_path)
    text = shown(run, step="10", sort="score_diff", n=3)
    assert "PPO samples of update 10" in text and "response 10.4" in text and "response 1.4" not in text
    assert text.index("response 10.4") < text.index("response 10.3")
    assert "page 1/2, rows 1-3 of 5; next: --page 2" in text
    assert "response 10.0" in shown(run, step="last", sort="-score_diff", n=1)
    with pytest.raises(UserError, match="no PPO samples for update 7; updates with samples: 1, 10"):
        shown(run, step=7)
    with pytest.raises(UserError, match="--step"):
        shown(run, step="abc")


def test_inspect_user_errors(tmp_path):
    from rlhf.inspect import show_generations

    with pytest.raises(UserError, match="run directory not found"):
        show_generations(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"generations.jsonl not found.*rlhf(\.cli)? eval CONFIG"):
        show_generations(tmp_path / "empty")
    with pytest.raises(UserError, match="samples.jsonl not found"):
        show_generations(tmp_path / "empty", step=1)


def test_load_run_and_top_changes(tmp_path):
    pd = pytest.importorskip("pandas")
    from rlhf.inspect import load_run, plot_curves, side_by_side, top_changes

    run = load_run(make_run(tmp_path))
    assert set(run) == {"ppo_metrics", "samples", "generations", "eval_metrics"}
    assert isinstance(run["eval_metrics"], pd.Series) and run["eval_metrics"]["num_prompts"] == 23
    assert len(run["ppo_metrics"]) == 15 and len(run["samples"]) == 10 and len(run["generations"]) == 23
    improvements, regressions = top_changes(run["generations"], n=3)
    assert list(improvements["gold_diff"]) == [1.5, 1.5, 1.5] and list(improvements.index) == [3, 7, 11]
    assert list(regressions["gold_diff"]) == [-1.5, -1.5, -1.5] and list(regressions.index) == [0, 4, 8]
    imp, reg = top_changes(run["generations"], n=2, by="score")
    assert list(imp["score_diff"]) == [3.0, 3.0] and list(reg["score_diff"]) == [-3.0, -3.0]
    fig = plot_curves(run)
    assert len(fig.axes) >= 3 and any(ax.get_lines() for ax in fig.axes)
    html_text = side_by_side(improvements, regressions, titles=("up", "down"))._repr_html_()
    assert "up" in html_text and "&lt;b&gt;tag" in html_text
    with pytest.raises(UserError, match="no gold"):
        top_changes(load_run(make_run(tmp_path / "b", gold=False))["generations"])


def test_load_run_without_pandas_is_a_user_error(tmp_path, monkeypatch):
    from rlhf.inspect import load_run

    monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas -> ImportError
    with pytest.raises(UserError, match="pip install pandas"):
        load_run(make_run(tmp_path))


# ---------------------------------------------------------------------------------------------
# the CLI on the tiny run


def rlhf_inspect(*args, block_pandas: bool = False):
    code = ("import sys\n"
            + ("sys.modules['pandas'] = None\n" if block_pandas else "")
            + "from rlhf.cli import main\nsys.exit(main(sys.argv[1:]))")
    env = {**os.environ, "COLUMNS": "1000"}
    return subprocess.run([sys.executable, "-c", code, "inspect", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=120, cwd=PROJECT_ROOT)


def test_cli_inspect_tiny_run(tiny_run_dir):
    from rlhf.utils import read_jsonl

    rows = read_jsonl(tiny_run_dir / "eval" / "generations.jsonl")
    proc = rlhf_inspect(tiny_run_dir, "--sort", "index", "--n", "2", block_pandas=True)  # no pandas needed
    assert proc.returncode == 0, proc.stderr
    assert rows[0]["prompt"] in proc.stdout and rows[1]["prompt"] in proc.stdout
    assert rows[0]["policy_response"] in proc.stdout and rows[0]["ref_response"] in proc.stdout
    assert f"page 1/{-(-len(rows) // 2)}, rows 1-2 of {len(rows)}; next: --page 2" in proc.stdout

    word = Counter(w for r in rows for w in r["policy_response"].split()).most_common(1)[0][0]
    matches = [r for r in rows if any(word.lower() in r[k].lower() for k in ("prompt", "ref_response",
                                                                             "policy_response"))]
    assert len(matches) > 3
    proc = rlhf_inspect(tiny_run_dir, "--sort", "kl", "--contains", word.upper(), "--page", "2", "--n", "3")
    assert proc.returncode == 0, proc.stderr
    pages = -(-len(matches) // 3)
    assert f"page 2/{pages}, rows 4-6 of {len(matches)}" in proc.stdout
    by_kl = sorted(range(len(matches)), key=lambda i: -matches[i]["kl"])[3:6]
    for i in by_kl:
        assert matches[i]["prompt"] in proc.stdout

    proc = rlhf_inspect(tiny_run_dir, "--step", "last", "--n", "2")
    assert proc.returncode == 0, proc.stderr
    assert "PPO samples of update" in proc.stdout


def test_cli_inspect_missing_dir_is_one_line(tmp_path):
    proc = rlhf_inspect(tmp_path / "nope")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rlhf: error: run directory not found"), proc.stderr
