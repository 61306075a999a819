"""Sweep plots (matplotlib, no display): each returns the path of a PNG it wrote."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: workers and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points (size, accuracy) not beaten by a smaller-or-equal model with higher-or-equal accuracy."""
    front, best = [], float("-inf")
    for size, accuracy in sorted(points, key=lambda p: (p[0], -p[1])):
        if accuracy > best:
            front.append((size, accuracy))
            best = accuracy
    return front


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def accuracy_vs_temperature(trials: pd.DataFrame, metric: str, out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for chain, group in trials.groupby("chain"):
        ax.scatter(group["temperature"], group[metric], label=chain)
    ax.set(xlabel="temperature T", ylabel=metric, title="validation accuracy vs temperature")
    ax.legend(fontsize=7)
    return _save(fig, out / "val_accuracy_vs_temperature.png")


def alpha_temperature_map(trials: pd.DataFrame, metric: str, out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    points = ax.scatter(trials["temperature"], trials["alpha"], c=trials[metric], cmap="viridis", s=80)
    fig.colorbar(points, ax=ax, label=metric)
    ax.set(xlabel="temperature T", ylabel="alpha", title="alpha x temperature")
    return _save(fig, out / "alpha_temperature_map.png")


def accuracy_vs_params(trials: pd.DataFrame, out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.scatter(trials["params"], trials["test_accuracy"], label="trials")
    front = pareto_front(list(zip(trials["params"], trials["test_accuracy"])))
    ax.plot([p[0] for p in front], [p[1] for p in front], "r-o", label="Pareto front")
    ax.set(xscale="log", xlabel="student parameters", ylabel="test accuracy", title="accuracy vs size")
    ax.legend(fontsize=7)
    return _save(fig, out / "accuracy_vs_params.png")


def direct_vs_chain(trials: pd.DataFrame, metric: str, out: Path) -> Path:
    best = trials.groupby("chain")[metric].max().sort_values()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    bars = ax.barh(best.index, best.values)
    ax.bar_label(bars, fmt="%.4f", fontsize=8)
    low, high = float(best.min()), float(best.max())
    margin = max(high - low, 0.01)  # zoom in: the differences that matter are small
    ax.set_xlim(low - margin, high + margin)
    ax.set(xlabel=f"best {metric}", title="direct KD vs teacher-assistant chains")
    return _save(fig, out / "direct_vs_chain.png")


def member_curves(histories: dict[str, list[tuple[int, float]]], metric: str, out: Path) -> Path:
    """One line per model of a job (each student solid, its label-only twin dashed in the same colour) over epochs."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    colours: dict[str, str] = {}
    for name, points in histories.items():
        if not points:
            continue
        base = name.removesuffix("-baseline")
        colour = colours.setdefault(base, f"C{len(colours) % 10}")
        steps, values = zip(*points)
        ax.plot([s + 1 for s in steps], values, color=colour, linestyle="--" if name.endswith("-baseline") else "-",
                label=f"{base} (labels only)" if name.endswith("-baseline") else name)
    ax.set(xlabel="epoch", ylabel=metric.replace("_", " "), title=f"{metric.replace('_', ' ')}: students and their label-only twins")
    ax.legend(fontsize=7)
    return _save(fig, out / f"{metric}.png")
