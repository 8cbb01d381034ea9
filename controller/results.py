"""A run's results folder: every node's log and metrics, plots, summary.json."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from dml_app import formats, net


def new_run_dir(base: Path, algorithm: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    d = base / f"{stamp}-{algorithm}"
    n = 1
    while d.exists():
        n += 1
        d = base / f"{stamp}-{algorithm}-{n}"
    d.mkdir(parents=True)
    return d


def safe_log_path(run_dir: Path, name: str, suffix: str = ".log") -> Path:
    """The file for node `name`'s log; ValueError for names that could leave run_dir."""
    if not formats.is_name(name):
        raise ValueError(f"bad node name {name!r} for a log file")
    p = (run_dir / f"{name}{suffix}").resolve()
    if p.parent != run_dir.resolve():
        raise ValueError(f"bad node name {name!r} for a log file")
    return p


def parse_metrics(text: str) -> list[dict]:
    """A node's metrics lines (JSON objects). A node app is not trusted: lines that are not
    bounded JSON objects are skipped, a record whose `round` is not an integer in [0, 1e9]
    too, and `accuracy`, `loss` or `layer` that are not numbers are dropped from theirs
    (NaN stays: a diverged loss is a fact worth plotting)."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if not isinstance(rec, dict):
            continue
        if "round" in rec:
            try:
                rec["round"] = net.number(rec["round"], "round", 0, 10**9, integer=True)
            except ValueError:
                continue
        for key in ("accuracy", "loss", "layer"):
            v = rec.get(key)
            if key in rec and (isinstance(v, bool) or not isinstance(v, (int, float))
                               or (key == "layer" and not (isinstance(v, int) and 0 <= v <= 64))):
                del rec[key]
        out.append(rec)
    return out


def event_rounds(events: list[dict] | None, metrics: dict[str, list[dict]], t0: float | None) -> list[tuple[float, str, bool]]:
    """Where each scenario event falls on the round axis: (round, label, ok). The time of
    each round is when its first record (aggregate or train, any node; their "t") came;
    an event's time t0 + t is placed by linear interpolation between those (round 0 at
    t0), after the last round at the last round. Events or times that are not finite
    numbers are left out."""
    if not events or t0 is None or not isinstance(t0, (int, float)) or not math.isfinite(t0):
        return []
    first: dict[int, float] = {}
    for recs in metrics.values():
        for r in recs:
            t = r.get("t")
            if r.get("event") in ("aggregate", "train") and "round" in r and isinstance(t, (int, float)) \
                    and not isinstance(t, bool) and math.isfinite(t):
                first[r["round"]] = min(first.get(r["round"], t), t)
    pts = [(t0, 0)]
    for t, rnd in sorted((t, rnd) for rnd, t in first.items() if t >= t0):
        if rnd > pts[-1][1]:            # rounds only go up along the time axis
            pts.append((t, rnd))
    out = []
    for e in events:
        t = e.get("t")
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
            continue
        when = t0 + t
        x = float(pts[-1][1])
        for (ta, ra), (tb, rb) in zip(pts, pts[1:]):
            if when <= tb:
                x = ra + (rb - ra) * (max(when, ta) - ta) / (tb - ta) if tb > ta else float(rb)
                break
        what = e.get("node") or "->".join(map(str, e.get("link") or []))
        out.append((x, f"{e.get('action')} {what}"[:24], bool(e.get("ok"))))
    return out


def draw(run_dir: Path, metrics: dict[str, list[dict]], root: str | None, *,
         events: list[dict] | None = None, t0: float | None = None) -> list[str]:
    """accuracy.png (aggregating nodes), loss.png (training nodes), summary.png (both);
    scenario events (summary.json's "events", times after t0) as dashed vertical marks
    with a short label (red: the action failed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = {n: [(r["round"], r["accuracy"]) for r in recs if r.get("event") == "aggregate"
               and "accuracy" in r and "round" in r] for n, recs in metrics.items()}
    acc = {n: v for n, v in acc.items() if v}
    loss = {n: [(r["round"], r["loss"]) for r in recs if r.get("event") == "train"
                and "loss" in r and "round" in r] for n, recs in metrics.items()}
    loss = {n: v for n, v in loss.items() if v}

    def plot_acc(ax):
        for n, pts in sorted(acc.items()):
            ax.plot(*zip(*pts), marker="o", label=n + (" (root)" if n == root else ""))
        ax.set_xlabel("round")
        ax.set_ylabel("test accuracy")
        ax.set_title("Aggregate accuracy per round")
        ax.grid(alpha=.3)
        if acc:
            ax.legend(fontsize=8)

    def plot_loss(ax):
        for n, pts in sorted(loss.items()):
            ax.plot(*zip(*pts), marker=".", label=n)
        ax.set_xlabel("round")
        ax.set_ylabel("training loss")
        ax.set_title("Training loss per round")
        ax.grid(alpha=.3)
        if loss:
            ax.legend(fontsize=8, ncol=2)

    marks = event_rounds(events, metrics, t0)

    def mark(ax):
        for x, label, ok in marks:
            ax.axvline(x, color="tab:gray" if ok else "tab:red", linestyle="--", linewidth=1, alpha=.8)
            ax.text(x, 0.98, " " + label, transform=ax.get_xaxis_transform(), rotation=90, va="top",
                    ha="right", fontsize=7, color="dimgray" if ok else "tab:red")

    files = []
    for fname, fns in (("accuracy.png", [plot_acc]), ("loss.png", [plot_loss]),
                       ("summary.png", [plot_acc, plot_loss])):
        fig, axes = plt.subplots(1, len(fns), figsize=(6 * len(fns), 4.2), squeeze=False)
        for fn, ax in zip(fns, axes[0]):
            fn(ax)
            mark(ax)
        fig.tight_layout()
        fig.savefig(run_dir / fname, dpi=110)
        plt.close(fig)
        files.append(fname)
    return files


def summarize(algorithm: str, metrics: dict[str, list[dict]], root: str | None,
              wall_seconds: float, bytes_sent: dict[str, int]) -> dict:
    """summary.json: the root's accuracy per round; with no root (gossip, ring), the
    mean over the nodes of each round's accuracy, and of their last accuracies."""
    aggs = {n: [r for r in recs if r.get("event") == "aggregate" and "accuracy" in r and "round" in r]
            for n, recs in metrics.items()}
    aggs = {n: v for n, v in aggs.items() if v}
    if root in aggs:
        per_round = [{"round": r["round"], "accuracy": r["accuracy"]} for r in aggs[root]]
        final = per_round[-1]["accuracy"] if per_round else None
    else:
        by_round: dict[int, list[float]] = {}
        for recs in aggs.values():
            for r in recs:
                by_round.setdefault(r["round"], []).append(r["accuracy"])
        per_round = [{"round": k, "accuracy": sum(v) / len(v)} for k, v in sorted(by_round.items())]
        finals = [recs[-1]["accuracy"] for recs in aggs.values()]
        final = sum(finals) / len(finals) if finals else None
    return {"algorithm": algorithm,
            "rounds": max((p["round"] for p in per_round), default=0),
            "final_accuracy": final,
            "wall_seconds": round(wall_seconds, 2),
            "accuracy_per_round": per_round,
            "bytes_sent": bytes_sent,
            "nodes": sorted(metrics)}


def table(summary: dict) -> str:
    """The summary as a plain-text table for the terminal."""
    lines = [f"{'round':>5}  {'accuracy':>8}"]
    lines += [f"{p['round']:>5}  {p['accuracy']:>8.4f}" for p in summary["accuracy_per_round"]]
    lines.append("")
    lines.append(f"{'node':<8} {'bytes sent':>12}")
    lines += [f"{n:<8} {b:>12,}" for n, b in sorted(summary["bytes_sent"].items())]
    lines.append("")
    if summary.get("events"):
        lines.append(f"{'t (s)':>8}  {'at':>6}  event")
        for e in summary["events"]:
            what = e.get("node") or ("<->" if e.get("dir") == "both" else "->").join(map(str, e.get("link") or []))
            lines.append(f"{e['t']:>8.1f}  {e['at']:>6g}  {e['action']} {what}{' ' + e['bw'] if e.get('bw') else ''}: "
                         f"{'ok' if e['ok'] else 'FAILED'} {' '.join(str(e.get('detail', '')).split())[:80]}")
        lines.append("")
    fa = summary["final_accuracy"]
    lines.append(f"algorithm {summary['algorithm']}: {summary['rounds']} rounds, final accuracy "
                 f"{fa:.4f}, wall time {summary['wall_seconds']:.1f} s" if fa is not None else
                 f"algorithm {summary['algorithm']}: no accuracy reported, wall time {summary['wall_seconds']:.1f} s")
    return "\n".join(lines)
