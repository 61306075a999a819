"""Sweep plots: the Pareto front (pure) and that every plot writes a PNG."""

from __future__ import annotations

import pandas as pd

from orchestrator.tracking import plots


def test_pareto_front_keeps_only_undominated_points():
    points = [(100, 0.80), (200, 0.79), (300, 0.85), (300, 0.84), (50, 0.70), (400, 0.85)]
    assert plots.pareto_front(points) == [(50, 0.70), (100, 0.80), (300, 0.85)]


def test_plots_write_pngs(tmp_path):
    trials = pd.DataFrame({
        "chain": ["direct", "direct", "mlp48"], "temperature": [2.0, 6.0, 4.0], "alpha": [0.5, 0.9, 0.7],
        "val_accuracy": [0.8, 0.85, 0.83], "params": [1210, 1210, 1210], "test_accuracy": [0.79, 0.84, 0.82],
    })
    paths = [
        plots.accuracy_vs_temperature(trials, "val_accuracy", tmp_path),
        plots.alpha_temperature_map(trials, "val_accuracy", tmp_path),
        plots.accuracy_vs_params(trials, tmp_path),
        plots.direct_vs_chain(trials, "val_accuracy", tmp_path),
    ]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
