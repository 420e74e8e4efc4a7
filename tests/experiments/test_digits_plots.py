"""The digits sweep plot's affNIST-protocol bars: a zoomed y axis that says so, and each bar's value printed.
Checked on the matplotlib objects (limits, texts), not on pixels."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend

from kprpe.experiments import report  # noqa: E402

CALIBRATED = Path(__file__).resolve().parents[2] / "docs" / "results" / "mnist_calibrated"


def _drawn_figure(monkeypatch, tmp_path, results: dict, head: str, regime: str):
    """plot_sweeps' figure, kept open: pyplot's close only records what it was given."""
    kept = []
    monkeypatch.setattr(plt, "close", lambda fig=None: kept.append(fig))
    report.plot_sweeps(results, report.aggregate(results), head, regime, tmp_path / "sweeps.png")
    monkeypatch.undo()
    assert (tmp_path / "sweeps.png").is_file() and len(kept) == 1
    return kept[0]


def test_the_affnist_bars_zoom_to_where_they_differ_and_print_their_values(monkeypatch, tmp_path):
    results = json.loads((CALIBRATED / "digits_results.json").read_text(encoding="utf-8"))
    fig = _drawn_figure(monkeypatch, tmp_path, results, "flatten", "calibrated")
    try:
        (ax,) = [a for a in fig.axes if a.get_title() == "affNIST protocol"]
        # lowest bar: Abs-PE* 77.44 - 0.56 std; 2 points below, down to a multiple of 5
        assert ax.get_ylim() == (70, 100)
        assert ax.get_ylabel() == "test accuracy (%), axis from 70"
        summary = report.aggregate(results)["flatten"]["calibrated"]
        means = [summary[m]["affnist"]["mean"] for m in report.MODEL_SPECS if m in summary]
        assert [t.get_text() for t in ax.texts] == [f"{m:.1f}" for m in means]
        assert [t.get_text() for t in ax.texts][:3] == ["78.3", "77.4", "81.9"]
        for text, mean in zip(ax.texts, means, strict=True):  # above its bar (and its error bar)
            assert text.get_position()[1] > mean and text.get_va() == "bottom"
    finally:
        plt.close(fig)


def test_low_bars_keep_the_axis_from_zero_and_a_full_bar_is_labelled_inside():
    fig, ax = plt.subplots()
    try:
        assert report.affnist_bars(ax, [(12.0, 1.0), (99.5, 0.2)], ["C0", "C1"]) == 0
        assert ax.get_ylim() == (0, 100) and ax.get_ylabel() == "test accuracy (%)"
        low, full = ax.texts
        assert (low.get_text(), low.get_va()) == ("12.0", "bottom")
        assert (full.get_text(), full.get_va()) == ("99.5", "top") and full.get_position()[1] < 99.5
    finally:
        plt.close(fig)
