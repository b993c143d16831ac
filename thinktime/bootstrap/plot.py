"""Accuracy per STaR round: held-out greedy accuracy with 95% Wilson intervals (PNG); and held-out accuracy
against training wall time, one line per run (STaR and GRPO on one plot)."""
from __future__ import annotations

from pathlib import Path

from thinktime.evaluation.report import pyplot, save_figure


def plot_rounds(rounds: list[dict], path: str | Path, title: str = "") -> Path:
    """`rounds`: the summary entries of a bootstrap run (round, eval{accuracy, ci}, data{sample_accuracy})."""
    xs = [r["round"] for r in rounds if r.get("eval")]
    acc = [100 * r["eval"]["accuracy"] for r in rounds if r.get("eval")]
    low = [max(0.0, a - 100 * r["eval"]["ci"][0]) for a, r in zip(acc, [r for r in rounds if r.get("eval")])]
    high = [max(0.0, 100 * r["eval"]["ci"][1] - a) for a, r in zip(acc, [r for r in rounds if r.get("eval")])]
    fig, ax = pyplot().subplots(figsize=(6.4, 4.2), dpi=120)
    ax.errorbar(xs, acc, yerr=[low, high], marker="o", capsize=4, label="held-out accuracy (greedy, 95% CI)")
    for x, y in zip(xs, acc):
        ax.annotate(f"{y:.0f}%", (x, y), textcoords="offset points", xytext=(6, 6), fontsize=9)
    # The training-set sample accuracy of the model that sampled round r+1 is a property of round r's model.
    sampled = [(r["round"] - 1, 100 * r["data"]["sample_accuracy"]) for r in rounds if r.get("data")]
    if sampled:
        ax.plot([x for x, _ in sampled], [y for _, y in sampled], marker="s", linestyle="--",
                label="training problems, sampled (T>0) accuracy")
    ax.set_xlabel("STaR round (0 = the starting model)")
    ax.set_ylabel("accuracy (%)")
    ax.set_xticks(xs)
    top = max([*acc, *(y for _, y in sampled), *(a + h for a, h in zip(acc, high)), 0.0])
    ax.set_ylim(0, min(100.0, max(50.0, top + 10)))
    return _save(fig, ax, path, title)


def plot_against_time(runs: dict[str, list[dict]], path: str | Path, title: str = "") -> Path:
    """`runs`: label -> the summary rounds of a bootstrap run (eval{accuracy, ci}, training_seconds)."""
    fig, ax = pyplot().subplots(figsize=(6.4, 4.2), dpi=120)
    top = 50.0
    for label, rounds in runs.items():
        points = [r for r in rounds if r.get("eval")]
        xs = [r.get("training_seconds", 0.0) / 60 for r in points]
        acc = [100 * r["eval"]["accuracy"] for r in points]
        err = [[max(0.0, a - 100 * r["eval"]["ci"][0]) for a, r in zip(acc, points)],
               [max(0.0, 100 * r["eval"]["ci"][1] - a) for a, r in zip(acc, points)]]
        ax.errorbar(xs, acc, yerr=err, marker="o", capsize=3, label=label)
        top = max(top, *(a + h for a, h in zip(acc, err[1])), 0.0)
    ax.set_xlabel("training wall time (minutes; sampling included)")
    ax.set_ylabel("held-out accuracy (%, greedy, 95% CI)")
    ax.set_ylim(0, min(100.0, top + 10))
    return _save(fig, ax, path, title)


def _save(fig, ax, path: str | Path, title: str) -> Path:
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return save_figure(fig, path)
