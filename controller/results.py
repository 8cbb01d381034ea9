"""A run's results folder: every node's log and metrics, plots, summary.json.

summary.json's "participants" (issue 11): every node's `participants` metrics events
(written by a role that leaves peers out of a round: FL per attempt, the parameter
server per sync version with someone missing, ...) as {"node", "round", ...the event's
fields but t and event} in time order, and "missing_nodes" {node: {"first_round",
"last_round", "why" (at its first round), "rounds_missed" (distinct rounds)}} over all of
them. Kept small for hundreds of nodes: at most MAX_PARTICIPANT_ENTRIES entries (the
first and the last halves; "participants_left_out" counts the rest; missing_nodes still
counts every event), each with at most MAX_ENTRY_KEYS fields, lists and objects of at
most MAX_NAMES items (a cut one gets "<key>_count": its size), strings of at most
MAX_TEXT characters; at most MAX_MISSING_NODES nodes in missing_nodes.

Serverless runs (controller/sl_run.py) add summary.json "serverless" (the invoker's
summary and activation records), activations.png (draw_activations) and the table's
activation lines."""
from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path

from dml_app import formats, net


# What a terminal would act on rather than show: C0 controls (ESC starts colour, cursor,
# title and clipboard sequences; BEL, BS, CR rewrite what is shown), DEL, C1 controls
# (0x9b is a one-character CSI) and Unicode's invisible direction and line controls.
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2066-\u2069\ufeff]")


def printable(text: str, *, newlines: bool = False) -> str:
    """`text` safe for the controller's console: every control character shown escaped
    (ESC as \\x1b, U+202E as \\u202e), newlines too unless `newlines`; for anything a
    node or an agent wrote (/print, errors in their answers, the summary table)."""
    def esc(m: re.Match) -> str:
        c = m.group()
        if newlines and c == "\n":
            return c
        return f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}"
    return _CONTROLS.sub(esc, str(text))


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


def write_run_file(run_dir: Path, name: str, data: bytes | str) -> Path:
    """Write `name` in run_dir as a new file: made under a temporary name with O_EXCL |
    O_NOFOLLOW in a descriptor of the folder, then renamed onto `name`, so a symlink or a
    hard link planted there is replaced, never followed or written through, and a reader
    sees the old file or the new one, never half of it."""
    if not name or "/" in name or name in (".", "..") or "\0" in name:
        raise ValueError(f"bad file name {name[:64]!r} in a run folder")
    if isinstance(data, str):
        data = data.encode()
    dfd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    tmp = f".{name}.{os.urandom(6).hex()}.part"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dfd)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dfd)
        except OSError:
            pass
        raise
    finally:
        os.close(dfd)
    return run_dir / name


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


MAX_PARTICIPANT_ENTRIES = 200
MAX_ENTRY_KEYS = 16
MAX_NAMES = 64
MAX_TEXT = 200
MAX_MISSING_NODES = 1000
MAX_TABLE_ROUNDS = 20           # results.table: lines of rounds with someone missing


def _scalar(v):
    """A JSON scalar as summary.json keeps it (strings cut), or None for anything else."""
    if isinstance(v, str):
        return v[:MAX_TEXT]
    if v is None or isinstance(v, (bool, int, float)):
        return v
    return None


def _entry(node: str, rec: dict) -> dict:
    """A participants event as a bounded summary entry {"node", "round", ...fields}."""
    out = {"node": node, "round": rec["round"]}
    for k, v in rec.items():
        if k in ("t", "event", "node", "round") or not isinstance(k, str):
            continue
        if len(out) >= MAX_ENTRY_KEYS + 2:
            break
        k = k[:64]
        if isinstance(v, list):
            out[k] = [_scalar(x) for x in v[:MAX_NAMES]]
            if len(v) > MAX_NAMES:
                out[f"{k}_count"] = len(v)
        elif isinstance(v, dict):
            out[k] = {str(n)[:64]: _scalar(x) for n, x in list(v.items())[:MAX_NAMES]}
            if len(v) > MAX_NAMES:
                out[f"{k}_count"] = len(v)
        else:
            out[k] = _scalar(v)
    return out


def participant_entries(metrics: dict[str, list[dict]]) -> list[dict]:
    """Every node's participants events as entries {"node", "round", ...}, in time order
    (records without a finite time last, in their node's order); not yet cut to size."""
    timed = []
    for node, recs in metrics.items():
        for i, r in enumerate(recs):
            if r.get("event") != "participants" or "round" not in r:
                continue
            t = r.get("t")
            ok = isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t)
            timed.append(((0, t) if ok else (1, 0.0), node, i, _entry(node, r)))
    timed.sort(key=lambda x: x[:3])
    return [e for *_, e in timed]


def missing_nodes(entries: list[dict]) -> dict[str, dict]:
    """{node: {"first_round", "last_round", "why", "rounds_missed"}} of every node some
    entry's "missing" {node: why} names: why at its first round; rounds_missed counts
    distinct rounds (one round tried again, or reported by several nodes, counts once)."""
    rounds: dict[str, set] = {}
    out: dict[str, dict] = {}
    for e in entries:
        missing, rnd = e.get("missing"), e.get("round")
        if not isinstance(missing, dict) or isinstance(rnd, bool) or not isinstance(rnd, int):
            continue
        for node, why in missing.items():
            if node not in out:
                if len(out) >= MAX_MISSING_NODES:
                    continue
                out[node] = {"first_round": rnd, "last_round": rnd, "why": why, "rounds_missed": 0}
                rounds[node] = set()
            m = out[node]
            if rnd < m["first_round"]:
                m["first_round"], m["why"] = rnd, why
            m["last_round"] = max(m["last_round"], rnd)
            rounds[node].add(rnd)
    for node, m in out.items():
        m["rounds_missed"] = len(rounds[node])
    return dict(sorted(out.items()))


def bounded_entries(entries: list[dict]) -> tuple[list[dict], int]:
    """(at most MAX_PARTICIPANT_ENTRIES entries: the first and last halves, the number left out)."""
    if len(entries) <= MAX_PARTICIPANT_ENTRIES:
        return list(entries), 0
    half = MAX_PARTICIPANT_ENTRIES // 2
    return entries[:half] + entries[-half:], len(entries) - 2 * half


def add_participants(summary: dict, entries: list[dict]) -> dict:
    """Add a manager's own participants entries (e.g. a ring's re-formed rounds) to a
    summary that may have some already: the list is kept in order and bounded again, and
    missing_nodes merged (rounds_missed adds up). Returns the summary."""
    new = [e for e in entries if isinstance(e, dict)]
    merged, left = bounded_entries(list(summary.get("participants") or []) + new)
    summary["participants"] = merged
    left += summary.get("participants_left_out", 0)
    if left:
        summary["participants_left_out"] = left
    have = dict(summary.get("missing_nodes") or {})
    for node, m in missing_nodes(new).items():
        if node in have and isinstance(have[node], dict):
            h = have[node]
            if m["first_round"] < h.get("first_round", m["first_round"] + 1):
                h["first_round"], h["why"] = m["first_round"], m["why"]
            h["last_round"] = max(h.get("last_round", m["last_round"]), m["last_round"])
            h["rounds_missed"] = h.get("rounds_missed", 0) + m["rounds_missed"]
        elif len(have) < MAX_MISSING_NODES:
            have[node] = m
    summary["missing_nodes"] = dict(sorted(have.items()))
    return summary


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


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def draw_activations(run_dir: Path, records: list[dict], *, t0: float | None = None) -> list[str]:
    """activations.png (serverless runs): every activation as a bar on its node's line,
    from its start to its end (seconds after t0, else after the first start), blue when
    cold (its container got /init first: that part drawn hatched), orange when warm,
    outlined red when it did not succeed; [] when no record has finite times."""
    acts = [r for r in records if isinstance(r, dict) and _finite(r.get("start")) and _finite(r.get("end"))
            and r["end"] >= r["start"]]
    if not acts:
        return []
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    base = t0 if _finite(t0) else min(r["start"] for r in acts)
    nodes = sorted({str(r.get("node")) for r in acts})
    row = {n: i for i, n in enumerate(nodes)}
    fig, ax = plt.subplots(figsize=(10, 1.6 + 0.5 * len(nodes)))
    for r in acts:
        y, x0, width = row[str(r.get("node"))], r["start"] - base, r["end"] - r["start"]
        cold = bool(r.get("cold"))
        ok = r.get("status") == "success"
        ax.barh(y, width, left=x0, height=0.6, color="tab:blue" if cold else "tab:orange", alpha=.85,
                edgecolor="black" if ok else "tab:red", linewidth=0.5 if ok else 1.5)
        init = r.get("init_s")
        if cold and _finite(init) and 0 < init <= width:
            ax.barh(y, init, left=x0, height=0.6, color="none", edgecolor="white", hatch="///", linewidth=0)
    ax.set_yticks(range(len(nodes)), nodes)
    ax.set_xlabel("seconds since the start" if _finite(t0) else "seconds since the first activation")
    ax.set_title(f"Activations over time ({sum(bool(r.get('cold')) for r in acts)} cold, "
                 f"{sum(not r.get('cold') for r in acts)} warm)", pad=24)
    ax.grid(axis="x", alpha=.3)
    ax.legend(handles=[Patch(color="tab:blue", label="cold (/init, hatched, then /run)"),
                       Patch(color="tab:orange", label="warm (/run only)"),
                       Patch(facecolor="white", edgecolor="tab:red", label="not a success")],
              fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, frameon=False)
    fig.tight_layout()
    fig.savefig(run_dir / "activations.png", dpi=110)
    plt.close(fig)
    return ["activations.png"]


def _serverless_lines(summary: dict) -> list[str]:
    """The table's lines on a serverless run's activations; [] for other runs."""
    sl = summary.get("serverless")
    if not isinstance(sl, dict):
        return []

    def stat(key: str) -> str:
        s = sl.get(key) or {}
        parts = [f"{k} {s[k]:.3f} s" for k in ("mean", "p50", "max") if _finite(s.get(k))]
        return ", ".join(parts) or "-"
    moved = sl.get("bytes_moved") or {}
    mb = lambda k: f"{moved[k] / 1e6:.2f} MB" if _finite(moved.get(k)) else "-"  # noqa: E731
    return [f"activations {sl.get('activations')} ({sl.get('cold')} cold, {sl.get('warm')} warm), "
            f"{sl.get('errors')} error(s), {sl.get('retries')} retried, {sl.get('rounds_invoked')} invocation round(s)",
            f"  cold start overhead: {stat('cold_start_s')}",
            f"  warm start overhead: {stat('warm_start_s')}",
            f"  bytes moved: data {mb('data_down')}, parameters {mb('params_down')}, gradients {mb('gradients_up')}",
            *[f"  {str(n)[:8]:<8} gradients up {b.get('gradients_up', 0) / 1e6:.2f} MB, parameters down "
              f"{b.get('params_down', 0) / 1e6:.2f} MB, data down {b.get('data_down', 0) / 1e6:.2f} MB"
              for n, b in list((moved.get("by_node") or {}).items())[:MAX_TABLE_ROUNDS] if isinstance(b, dict)],
            ""]


def summarize(algorithm: str, metrics: dict[str, list[dict]], root: str | None,
              wall_seconds: float, bytes_sent: dict[str, int]) -> dict:
    """summary.json: the root's accuracy per round; with no root (gossip, ring), the
    mean over the nodes of each round's accuracy, and of the last accuracies of the
    nodes that reached the last round."""
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
        # the nodes that reached the last round: one left out earlier (a lost ring member,
        # a dead peer) would bring a stale accuracy into the final one
        last = max((recs[-1]["round"] for recs in aggs.values()), default=None)
        finals = [recs[-1]["accuracy"] for recs in aggs.values() if recs[-1]["round"] == last]
        final = sum(finals) / len(finals) if finals else None
    entries = participant_entries(metrics)
    kept, left = bounded_entries(entries)
    out = {"algorithm": algorithm,
           "rounds": max((p["round"] for p in per_round), default=0),
           "final_accuracy": final,
           "wall_seconds": round(wall_seconds, 2),
           "accuracy_per_round": per_round,
           "bytes_sent": bytes_sent,
           "nodes": sorted(metrics),
           "participants": kept,
           "missing_nodes": missing_nodes(entries)}
    if left:
        out["participants_left_out"] = left
    return out


def _missing_lines(summary: dict) -> list[str]:
    """The table's lines on who was missing: one per round with someone missing (at most
    MAX_TABLE_ROUNDS), then missing_nodes; [] when nobody was."""
    by_round: dict = {}
    for e in summary.get("participants") or []:
        missing = e.get("missing") if isinstance(e, dict) else None
        if isinstance(missing, dict) and missing:
            by_round.setdefault(e.get("round"), {}).update(missing)
    nodes = summary.get("missing_nodes") or {}
    if not by_round and not nodes:
        return []
    lines = [f"{'round':>5}  missing (why)"]
    for rnd, missing in list(by_round.items())[:MAX_TABLE_ROUNDS]:
        text = ", ".join(f"{n} ({why})" for n, why in sorted(missing.items(), key=lambda x: str(x[0])))
        lines.append(f"{str(rnd):>5}  {text[:100]}{'...' if len(text) > 100 else ''}")
    if len(by_round) > MAX_TABLE_ROUNDS:
        lines.append(f"  ... and {len(by_round) - MAX_TABLE_ROUNDS} more round(s) with someone missing")
    if summary.get("participants_left_out"):
        lines.append(f"  ({summary['participants_left_out']} participants entries left out of summary.json)")
    if nodes:
        lines.append(f"{'node':<8} {'first':>6} {'last':>6} {'missed':>6}  why")
        for n, m in list(nodes.items())[:MAX_TABLE_ROUNDS]:
            if isinstance(m, dict):
                lines.append(f"{str(n)[:8]:<8} {str(m.get('first_round')):>6} {str(m.get('last_round', '')):>6} "
                             f"{str(m.get('rounds_missed')):>6}  {str(m.get('why'))[:40]}")
        if len(nodes) > MAX_TABLE_ROUNDS:
            lines.append(f"  ... and {len(nodes) - MAX_TABLE_ROUNDS} more node(s)")
    lines.append("")
    return lines


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
    lines += _missing_lines(summary)
    lines += _serverless_lines(summary)
    fa = summary["final_accuracy"]
    lines.append(f"algorithm {summary['algorithm']}: {summary['rounds']} rounds, final accuracy "
                 f"{fa:.4f}, wall time {summary['wall_seconds']:.1f} s" if fa is not None else
                 f"algorithm {summary['algorithm']}: no accuracy reported, wall time {summary['wall_seconds']:.1f} s")
    return printable("\n".join(lines), newlines=True)
