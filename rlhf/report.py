"""A self-contained HTML report of a run: `<run_dir>/eval/report.html`, plus its plots as PNGs.

`write_report(run_dir)` reads only the run's files (`config.yaml`, `eval/metrics.json`,
`eval/generations.jsonl`, `eval/frontier.jsonl`, `ppo/metrics.jsonl`) and writes next to the report:
- `curves.png`: RM score and gold score over PPO updates with the KL on a second panel, and both
  scores against the KL, so over-optimisation (RM score up, gold flat or down) shows;
- `length.png`: mean response length over PPO updates;
- `frontier.png` (with a frontier): gold, and RM score on a second panel, against the KL for
  best-of-n from the reference and for PPO (its path over checkpoints with `eval.checkpoints`).
The HTML embeds the PNGs as base64 data URIs and uses no external CSS or JS: it opens offline and
can be mailed as one file. Plots use matplotlib's Agg canvas without pyplot (no global state).
Missing inputs (no PPO metrics, no gold judge) skip the affected plot with a note.
"""

from __future__ import annotations

import base64
import html
import json
import math
import shlex
from pathlib import Path
from typing import Any, Sequence

from rlhf.eval_math import METRICS, best_of_n_log_n_at_kl
from rlhf.utils import atomic_write_text, read_jsonl, rlhf_command

RM_COLOR, GOLD_COLOR, KL_COLOR, REF_COLOR = "#1f77b4", "#d62728", "#7f7f7f", "#2ca02c"
SAMPLE_ROWS = 10


# ---------------------------------------------------------------------------------------------
# reading


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, ValueError):
        return None


def _read_rows(path: Path) -> list[dict[str, Any]]:
    try:
        return read_jsonl(path)
    except (FileNotFoundError, ValueError):
        return []


def run_name(run_dir: Path, config_text: str | None = None) -> str:
    """`run.name` from `config_text` (default: the run's config.yaml), or the folder name."""
    try:
        import yaml

        text = config_text if config_text is not None else (Path(run_dir) / "config.yaml").read_text()
        cfg = yaml.safe_load(text) or {}
        return str(cfg.get("run", {}).get("name") or Path(run_dir).name)
    except (FileNotFoundError, ValueError, AttributeError, ImportError):
        return Path(run_dir).resolve().name


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def series(rows: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of `key` over metric rows, skipping rows where it is missing or not finite."""
    xs, ys = [], []
    for i, r in enumerate(rows):
        v = r.get(key)
        if _finite(v):
            xs.append(r.get("step", i + 1))
            ys.append(float(v))
    return xs, ys


def smooth(ys: Sequence[float], alpha: float = 0.3) -> list[float]:
    """Exponential moving average (bias-free at the start, like TensorBoard's)."""
    out, avg, weight = [], 0.0, 0.0
    for y in ys:
        avg = (1 - alpha) * avg + alpha * y
        weight = (1 - alpha) * weight + alpha
        out.append(avg / weight)
    return out


# ---------------------------------------------------------------------------------------------
# plots (shared with rlhf.inspect.plot_curves)


def new_figure(width: float, height: float):
    """A matplotlib Figure on an Agg canvas, outside pyplot (no global state, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _line(ax, xs, ys, color, label):
    if len(ys) > 10:  # raw values faint, smoothed values bold
        ax.plot(xs, ys, color=color, alpha=0.3, linewidth=1)
        ax.plot(xs, smooth(ys), color=color, linewidth=2, label=f"{label} (EMA)")
    else:
        ax.plot(xs, ys, color=color, linewidth=2, marker="o", markersize=3, label=label)


def draw_curves(fig, rows: Sequence[dict[str, Any]], eval_metrics: dict[str, Any] | None = None) -> list[str]:
    """Draw score/gold/KL curves of PPO metric rows into `fig`; returns notes on what was skipped.

    Panels: (1) RM score and gold over updates, (2) KL over updates, (3) RM score and gold against
    KL, coloured by update, with the eval result of the final policy as stars.
    """
    notes: list[str] = []
    steps, scores = series(rows, "objective/scores")
    gsteps, gold = series(rows, "objective/gold")
    ksteps, kl = series(rows, "objective/kl")
    if not rows:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, "no PPO metrics (ppo/metrics.jsonl missing or empty)", ha="center", va="center")
        ax.set_axis_off()
        return ["no PPO metrics (ppo/metrics.jsonl missing or empty): training curves skipped"]
    if not gold:
        notes.append("no gold score in the PPO metrics (no gold judge configured): gold curves skipped")
    ax1, ax2, ax3 = fig.subplots(1, 3)

    if scores:
        _line(ax1, steps, scores, RM_COLOR, "RM score")
    if gold:
        _line(ax1, gsteps, gold, GOLD_COLOR, "gold score")
    ax1.set(title="scores over PPO updates", xlabel="PPO update", ylabel="mean score per response")
    ax1.grid(alpha=0.3)
    ax1.legend(loc="best", fontsize=8)

    if kl:
        _line(ax2, ksteps, kl, KL_COLOR, "KL(policy || ref)")
    ax2.set(title="KL to the reference", xlabel="PPO update", ylabel="sequence KL (nats)")
    ax2.grid(alpha=0.3)
    ax2.legend(loc="best", fontsize=8)

    kl_by_step = dict(zip(ksteps, kl))
    for (xs, ys, color, label, marker) in ((steps, scores, RM_COLOR, "RM score", "o"),
                                           (gsteps, gold, GOLD_COLOR, "gold score", "s")):
        pts = [(kl_by_step[s], y) for s, y in zip(xs, ys) if s in kl_by_step]
        if pts:  # a thin path in update order; later updates drawn more opaque
            from matplotlib.colors import to_rgba

            ax3.plot([p[0] for p in pts], [p[1] for p in pts], color=color, alpha=0.25, linewidth=1)
            base = to_rgba(color)
            colors = [(*base[:3], 0.2 + 0.8 * i / max(len(pts) - 1, 1)) for i in range(len(pts))]
            ax3.scatter([p[0] for p in pts], [p[1] for p in pts], c=colors, marker=marker, s=26,
                        edgecolors="none")
            ax3.scatter([], [], color=color, marker=marker, s=26, label=f"{label} (per update)")
    if eval_metrics and _finite(eval_metrics.get("kl")):
        for key, color, label in (("policy_score", RM_COLOR, "final policy, RM (eval)"),
                                  ("policy_gold", GOLD_COLOR, "final policy, gold (eval)")):
            if _finite(eval_metrics.get(key)):
                ax3.scatter([eval_metrics["kl"]], [eval_metrics[key]], marker="*", s=220, color=color,
                            edgecolors="black", linewidths=0.8, label=label, zorder=5)
    ax3.set(title="scores against KL (later updates darker)", xlabel="sequence KL (nats)",
            ylabel="mean score per response")
    ax3.grid(alpha=0.3)
    if ax3.has_data():
        ax3.legend(loc="best", fontsize=8)
    if not kl:
        notes.append("no objective/kl in the PPO metrics: KL panels empty")
    return notes


def draw_length(fig, rows: Sequence[dict[str, Any]], eval_metrics: dict[str, Any] | None = None) -> list[str]:
    steps, length = series(rows, "val/response_length")
    ax = fig.add_subplot(1, 1, 1)
    if length:
        _line(ax, steps, length, RM_COLOR, "policy (PPO rollouts)")
    for key, color, label in (("ref_length", REF_COLOR, "reference (eval)"), ("policy_length", GOLD_COLOR,
                                                                             "policy (eval)")):
        if eval_metrics and _finite(eval_metrics.get(key)):
            ax.axhline(eval_metrics[key], color=color, linestyle="--", linewidth=1.2, label=label)
    ax.set(title="response length", xlabel="PPO update", ylabel="mean response length (tokens)")
    ax.grid(alpha=0.3)
    if ax.has_data():
        ax.legend(loc="best", fontsize=8)
    return [] if length else ["no val/response_length in the PPO metrics: length curve skipped"]


def draw_frontier(fig, rows: Sequence[dict[str, Any]]) -> list[str]:
    """Draw eval/frontier.jsonl rows into `fig`: gold (left) and RM score (right) against KL, for
    best-of-n from the reference (n marked) and for PPO, whose checkpoints (`eval.checkpoints`) make a
    path in update order ending at the final policy (a star). Returns notes on what was skipped.

    The panels side by side show over-optimisation: PPO's path climbing past best-of-n on the RM
    score while falling back towards or below it on gold is the reward model being exploited."""
    import numpy as np

    bon = sorted((r for r in rows if r.get("method") == "best_of_n"), key=lambda r: r["n"])
    ppo = sorted((r for r in rows if r.get("method") == "ppo"), key=lambda r: r["step"])
    panels = [("score", "RM score", RM_COLOR)]
    notes = []
    if any(_finite(r.get("gold")) for r in rows):
        panels.insert(0, ("gold", "gold score", GOLD_COLOR))
    else:
        notes.append("no gold scores in eval/frontier.jsonl (no gold judge configured): RM score only")
    for ax, (key, label, color) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        pts = [(r["kl"], r[key], r["n"]) for r in bon if _finite(r.get(key))]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color=REF_COLOR, marker="o", linewidth=2,
                label="best-of-n from the reference")
        for x, y, n in pts:
            ax.annotate(f"n={n}", (x, y), textcoords="offset points", xytext=(4, -11), fontsize=8, color=REF_COLOR)
        path = [(r["kl"], r[key], r["step"]) for r in ppo if _finite(r.get(key)) and _finite(r.get("kl"))]
        if len(path) > 1:
            ax.plot([p[0] for p in path], [p[1] for p in path], color=color, marker="s", markersize=5,
                    linewidth=1.2, alpha=0.6, label="PPO checkpoints, in update order")
            for x, y, step in path[:-1]:
                ax.annotate(f"{step}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8, color=color)
        if path:
            ax.scatter([path[-1][0]], [path[-1][1]], marker="*", s=220, color=color, edgecolors="black",
                       linewidths=0.8, label=f"PPO final policy (update {path[-1][2]})", zorder=5)
        ax.set_xscale("function", functions=(_signed_sqrt, lambda x: np.sign(x) * np.square(x)))
        ax.set(title=f"{label} against KL", xlabel="KL to the reference (nats, square-root scale)",
               ylabel=f"mean {label} per response")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    return notes


def _signed_sqrt(x):
    """sqrt(KL) as the x scale, as in Gao et al. 2022 (gold vs KL is about linear in it for best-of-n);
    signed, since the k1 estimate of a policy close to the reference can be a little below 0."""
    import numpy as np

    return np.sign(x) * np.sqrt(np.abs(x))


def frontier_sentence(rows: Sequence[dict[str, Any]], metrics: dict[str, Any]) -> str:
    """One sentence on where the final PPO policy stands against best-of-n at its KL (empty without gold)."""
    bon = sorted((r for r in rows if r.get("method") == "best_of_n"), key=lambda r: r["n"])
    kl, gold, bon_gold = metrics.get("kl"), metrics.get("policy_gold"), metrics.get("bon_gold_at_policy_kl")
    if not bon or not all(_finite(x) for x in (kl, gold, bon_gold)):
        return ""
    diff = gold - bon_gold
    se = f" ± {metrics['kl_se']:.2g}" if _finite(metrics.get("kl_se")) else ""  # one standard error
    lead = f"{'ahead' if diff > 0 else 'behind' if diff < 0 else 'level'}" + (f" by {abs(diff):.3g}" if diff else "")
    if metrics.get("bon_policy_kl_beyond_range"):
        n_equal = math.exp(min(best_of_n_log_n_at_kl(kl), 700.0))
        return (f"The PPO policy's KL of {kl:.3g}{se} nats is beyond the largest n sampled: best-of-{bon[-1]['n']} reaches "
                f"gold {bon_gold:.3g} at {bon[-1]['kl']:.3g} nats, the PPO policy {gold:.3g} ({lead}), and "
                f"best-of-n would need n ≈ {n_equal:,.0f} to spend the same KL.")
    n_equal = math.exp(best_of_n_log_n_at_kl(kl))
    return (f"At its KL of {kl:.3g}{se} nats the PPO policy reaches gold {gold:.3g}; best-of-n from the reference "
            f"reaches {bon_gold:.3g} at the same KL (n ≈ {n_equal:.3g}, interpolated in log n): PPO is {lead}.")


def _save(fig, path: Path) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=110)
    tmp.replace(path)
    return path.read_bytes()


# ---------------------------------------------------------------------------------------------
# HTML


CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px auto; max-width: 1180px;
       color: #222; padding: 0 16px; line-height: 1.4; }
h1 { margin-bottom: 0; } .sub { color: #666; margin-top: 4px; }
h2 { border-bottom: 1px solid #ddd; padding-bottom: 4px; margin-top: 32px; }
table { border-collapse: collapse; font-size: 14px; }
th, td { border: 1px solid #ddd; padding: 4px 8px; vertical-align: top; text-align: left; }
th { background: #f4f4f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.key { font-family: ui-monospace, Menlo, Consolas, monospace; white-space: nowrap; }
.headline { display: flex; gap: 12px; flex-wrap: wrap; margin: 16px 0; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 8px 14px; min-width: 120px; }
.card .v { font-size: 22px; font-weight: 600; } .card .l { font-size: 12px; color: #666; }
img { max-width: 100%; border: 1px solid #eee; }
.note { background: #fff8e1; border-left: 4px solid #f0b400; padding: 6px 10px; margin: 8px 0; }
table.gen { width: 100%; table-layout: fixed; }
table.gen td { white-space: pre-wrap; word-wrap: break-word; }
table.gen td.prompt { background: #fafafa; }
.scores { font-size: 12px; color: #555; margin-top: 4px; white-space: normal; }
.pos { color: #1a7f37; font-weight: 600; } .neg { color: #c62828; font-weight: 600; }
pre.cfg { background: #f7f7f7; padding: 8px; font-size: 12px; overflow-x: auto; }
"""


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "—" if value is None else str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def _signed(value: Any) -> str:
    if not _finite(value):
        return "—"
    cls = "pos" if value > 0 else "neg" if value < 0 else ""
    return f'<span class="{cls}">{value:+.3g}</span>'


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def metrics_table(metrics: dict[str, Any]) -> str:
    keys = [k for k in METRICS if k in metrics] + sorted(k for k in metrics if k not in METRICS)
    rows = "".join(f'<tr><td class="key">{html.escape(k)}</td><td class="num">{html.escape(_fmt(metrics[k]))}</td>'
                   f'<td>{html.escape(METRICS.get(k, ""))}</td></tr>' for k in keys)
    return f"<table><tr><th>metric</th><th>value</th><th>meaning</th></tr>{rows}</table>"


def headline(metrics: dict[str, Any]) -> str:
    cards = [("policy_gold", "policy gold"), ("ref_gold", "reference gold"), ("gold_gain", "gold gain"),
             ("win_rate_gold", "gold win rate"), ("policy_score", "policy RM score"),
             ("ref_score", "reference RM score"), ("kl", "KL (nats)")]
    html_cards = "".join(f'<div class="card"><div class="v">{html.escape(_fmt(metrics[k]))}</div>'
                         f'<div class="l">{label}</div></div>' for k, label in cards if _finite(metrics.get(k)))
    return f'<div class="headline">{html_cards}</div>' if html_cards else ""


def pick_samples(rows: list[dict[str, Any]], n: int = SAMPLE_ROWS) -> list[int]:
    """Indices of `n` prompts spread evenly over the eval set (deterministic, not cherry-picked)."""
    if len(rows) <= n:
        return list(range(len(rows)))
    return sorted({round(i * (len(rows) - 1) / (n - 1)) for i in range(n)})


def _scores(row: dict[str, Any], who: str, with_kl: bool) -> str:
    parts = [f"RM {_fmt(row.get(f'{who}_score'))}"]
    if row.get(f"{who}_gold") is not None:
        parts.append(f"gold {_fmt(row.get(f'{who}_gold'))}")
    if row.get(f"{who}_length") is not None:
        parts.append(f"{_fmt(row.get(f'{who}_length'))} tokens")
    if with_kl:
        parts.append(f"KL {_fmt(row.get('kl'))}")
    return " · ".join(html.escape(p) for p in parts)


def generations_table(rows: list[dict[str, Any]], indices: list[int]) -> str:
    body = []
    for i in indices:
        r = rows[i]
        gold_diff = (r["policy_gold"] - r["ref_gold"]) if _finite(r.get("policy_gold")) and _finite(
            r.get("ref_gold")) else None
        score_diff = (r["policy_score"] - r["ref_score"]) if _finite(r.get("policy_score")) and _finite(
            r.get("ref_score")) else None
        diffs = f"Δ RM {_signed(score_diff)}" + (f" · Δ gold {_signed(gold_diff)}" if gold_diff is not None else "")
        body.append(
            f'<tr><td class="prompt"><b>#{i}</b> {html.escape(str(r.get("prompt", "")))}'
            f'<div class="scores">{diffs}</div></td>'
            f'<td>{html.escape(str(r.get("ref_response", "")))}'
            f'<div class="scores">{_scores(r, "ref", False)}</div></td>'
            f'<td>{html.escape(str(r.get("policy_response", "")))}'
            f'<div class="scores">{_scores(r, "policy", True)}</div></td></tr>')
    return ('<table class="gen"><colgroup><col style="width:28%"><col style="width:36%"><col style="width:36%">'
            '</colgroup><tr><th>prompt</th><th>reference</th><th>policy</th></tr>' + "".join(body) + "</table>")


def _notes(notes: list[str]) -> str:
    return "".join(f'<div class="note">{html.escape(n)}</div>' for n in notes)


def write_report(run_dir: Path, out: Path | None = None, config_text: str | None = None) -> Path:
    """Write `report.html` (+ curves.png, length.png, frontier.png) from the eval outputs in `out` (default
    `<run_dir>/eval`) and the run's PPO metrics; return its path. `config_text` is the config shown
    (default: the run's `config.yaml`)."""
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    if config_text is None:
        try:
            config_text = (run_dir / "config.yaml").read_text()
        except FileNotFoundError:
            config_text = ""
    name = run_name(run_dir, config_text or None)
    metrics = _read_json(out / "metrics.json") or {}
    generations = _read_rows(out / "generations.jsonl")
    ppo_rows = _read_rows(run_dir / "ppo" / "metrics.jsonl")

    curve_fig = new_figure(13, 4.2)
    curve_notes = draw_curves(curve_fig, ppo_rows, metrics)
    curves_png = _save(curve_fig, out / "curves.png")
    length_fig = new_figure(7.5, 3.6)
    length_notes = draw_length(length_fig, ppo_rows, metrics) if ppo_rows else []
    length_png = _save(length_fig, out / "length.png")
    frontier = _read_rows(out / "frontier.jsonl")
    if frontier:
        frontier_fig = new_figure(11, 4.2)
        frontier_notes = draw_frontier(frontier_fig, frontier)
        sentence = frontier_sentence(frontier, metrics)
        frontier_html = [f"<p>{html.escape(sentence)}</p>" if sentence else "", _notes(frontier_notes),
                         _img(_save(frontier_fig, out / "frontier.png"), "gold and RM score against KL: best-of-n "
                                                                            "from the reference and PPO")]
    else:
        (out / "frontier.png").unlink(missing_ok=True)
        frontier_html = [_notes(["no eval/frontier.jsonl (eval.best_of_n empty or greedy decoding): "
                                 "best-of-n comparison skipped"])]

    indices = pick_samples(generations)
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>RLHF report: {html.escape(name)}</title>", f"<style>{CSS}</style></head><body>",
        f"<h1>RLHF report: {html.escape(name)}</h1>",
        f'<p class="sub">run directory <code>{html.escape(str(run_dir))}</code> · reference vs PPO policy on '
        f'{html.escape(_fmt(metrics.get("num_prompts", len(generations))))} held-out prompts</p>',
        headline(metrics),
        "<h2>Metrics</h2>",
        metrics_table(metrics) if metrics else _notes(["eval/metrics.json missing: no metrics"]),
        "<h2>PPO training curves</h2>",
        "<p>Over-optimisation shows as the reward-model score rising while the gold score stays flat or falls "
        "as the KL to the reference grows. Stars: the final policy on the held-out prompts.</p>",
        _notes(curve_notes), _img(curves_png, "RM score, gold score and KL over PPO updates"),
        "<h2>PPO against best-of-n (gold vs KL)</h2>",
        "<p>Would sampling n answers from the reference and keeping the one the reward model likes best have "
        "done as well? Best-of-n's KL is the analytical log n − (n−1)/n; its scores are those of the reward "
        "model's picks on the same held-out prompts. With <code>eval.checkpoints: true</code> PPO's path over "
        "its checkpoints shows too: the RM score still rising past best-of-n while the gold score stalls or "
        "falls back towards it is over-optimisation, the reward model exploited.</p>",
        *frontier_html,
        "<h2>Response length</h2>",
        _notes(length_notes if ppo_rows else ["no PPO metrics: length curve skipped"]),
        _img(length_png, "response length over PPO updates"),
        f"<h2>Sample generations ({len(indices)} of {len(generations)}, evenly spaced)</h2>",
        generations_table(generations, indices) if generations else _notes(["eval/generations.jsonl missing"]),
        f"<p>All rows: <code>{html.escape(f'{rlhf_command()} inspect {shlex.quote(str(run_dir))}')}</code></p>",
    ]
    if config_text:
        parts += ["<h2>Config</h2>", f'<details><summary>config.yaml</summary><pre class="cfg">'
                                     f"{html.escape(config_text)}</pre></details>"]
    parts.append("</body></html>\n")
    path = out / "report.html"
    atomic_write_text(path, "\n".join(parts))
    return path
