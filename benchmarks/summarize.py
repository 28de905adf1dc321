"""Summarise benchmarks/results/*.json from side_by_side.sh: medians over all timed updates, and ratios."""

import json
import statistics
import sys
from pathlib import Path


def timed_updates(path: Path) -> tuple[list[float], list[float]]:
    """(seconds per update, the same without the peer's gc.collect time), first update of each run excluded."""
    r = json.loads(path.read_text())
    if "gc_seconds" in r:  # the peer lists every update, the first included
        times = r["per_update_seconds"][1:]
        return times, [t - g for t, g in zip(times, r["gc_seconds"][1:])]
    return r["per_update_seconds"], r["per_update_seconds"]  # `rlhf bench` already drops the first


def main(folder: str) -> None:
    runs: dict[tuple[str, str, str], tuple[list[float], list[float], list[float]]] = {}
    for path in sorted(Path(folder).glob("*.json")):
        who, model, epochs, _ = path.stem.split("_")
        times, without_gc = timed_updates(path)
        entry = runs.setdefault((who, model, epochs), ([], [], []))
        entry[0].extend(times)
        entry[1].extend(without_gc)
        entry[2].append(json.loads(path.read_text())["peak_rss_gib"])
    print("| model | PPO epochs | peer s/update (without its gc) | ours, same work | ratio (without peer gc) "
          "| ours, fast settings | ratio (without peer gc) | peak RSS peer / same / fast (GiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for model in ("tiny", "smollm2"):
        for epochs in ("e1", "e2"):
            peer = runs.get(("peer", model, epochs))
            ours = runs.get(("ours", model, epochs))
            fast = runs.get(("fast", model, epochs))
            if not peer or not ours:
                continue
            p, p_nogc = statistics.median(peer[0]), statistics.median(peer[1])
            o = statistics.median(ours[0])
            row = [model, epochs[1:], f"{p:.3f} ({p_nogc:.3f})", f"{o:.3f}", f"{o / p:.2f} ({o / p_nogc:.2f})"]
            if fast:
                f = statistics.median(fast[0])
                row += [f"{f:.3f}", f"{f / p:.2f} ({f / p_nogc:.2f})"]
            else:
                row += ["", ""]
            rss = [max(peer[2]), max(ours[2])] + ([max(fast[2])] if fast else [])
            row.append(" / ".join(f"{x:.2f}" for x in rss))
            print("| " + " | ".join(row) + " |")
    n = {k: len(v[0]) for k, v in runs.items()}
    print(f"\ntimed updates per cell: {sorted(set(n.values()))}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results")
