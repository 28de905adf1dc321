"""The eval report, `rlhf inspect` and the eval helpers (the inspection notebook: tests/test_readme.py).

Fast tests use small hand-made run directories; the rest use the real tiny run made once per
session by the `tiny_run_dir` fixture (tests/conftest.py).
"""

from __future__ import annotations

import base64
import html.parser
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from rlhf.evaluate import METRICS, distinct_n, win_rate
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


# ---------------------------------------------------------------------------------------------
# a hand-made run directory (no models)


def make_run(root: Path, n: int = 23, gold: bool = True, ppo: bool = True) -> Path:
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
    for png in ("curves.png", "length.png"):
        assert (run / "eval" / png).read_bytes()[:4] == b"\x89PNG"
    parser = parse_report(path)
    check_self_contained(parser, n_images=2)
    text = "".join(parser.text)
    assert "hand-made" in text
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
    check_self_contained(parser, n_images=2)
    assert "no gold score in the PPO metrics" in "".join(parser.text)


def test_report_of_the_tiny_run(tiny_run_dir):
    path = tiny_run_dir / "eval" / "report.html"
    parser = parse_report(path)
    check_self_contained(parser, n_images=2)
    text = " ".join(" ".join(parser.text).split())
    assert "RLHF report: tiny" in text
    metrics = json.loads((tiny_run_dir / "eval" / "metrics.json").read_text())
    for key in metrics:
        assert key in text and " ".join(METRICS[key].split()) in text
    first = json.loads((tiny_run_dir / "eval" / "generations.jsonl").read_text().splitlines()[0])
    assert " ".join(first["prompt"].split()) in text  # the sample starts at row 0
    assert parser.tags["tr"] >= len(metrics) + 1 + 10  # metrics table and 10 sample rows (+ headers)
    for png in ("curves.png", "length.png"):
        assert (tiny_run_dir / "eval" / png).stat().st_size > 10_000


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
