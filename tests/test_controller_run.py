"""benchmarks/controller_run.py's bookkeeping on synthetic runs: phases, bins, reaction times, scraped metrics."""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks.controller_run import Phase, bins, controller_metrics, first_move_after, phase_summary

PHASES = [Phase("a", "sst2", 10, 10.0), Phase("b", "other", 10, 10.0)]


def synthetic_run() -> dict[str, Any]:
    sent = []
    for i in range(200):
        at = i * 0.1
        in_b = at >= 10
        sent.append(
            {
                "at": at,
                "phase": "b" if in_b else "a",
                "status": 429 if in_b and i % 10 == 0 else 200,
                "latency_s": 0.2 if in_b else 0.01,
                "label_id": 1 if in_b and i % 4 == 0 else 0,  # in b, a quarter disagree with full depth
                "full_label_id": 0,
                "exit_layer": 3 if in_b else 6,
                "threshold": 0.3 if in_b else 0.0,
            }
        )
    return {"sent": sent, "num_layers": 6}


def test_phase_summary_scores_answers_against_full_depth() -> None:
    first, second = phase_summary(synthetic_run(), PHASES)
    assert first["requests"] == 100 and first["agreement"] == 1.0 and first["saving"] == 0.0
    assert first["p99_ms"] == pytest.approx(10.0)
    assert second["refused"] == 10 and second["answered"] == 0.9
    answered = [i for i in range(100, 200) if i % 10 != 0]
    assert second["agreement"] == pytest.approx(sum(i % 4 != 0 for i in answered) / len(answered))
    assert second["saving"] == pytest.approx(0.5) and second["mean_threshold"] == pytest.approx(0.3)
    (late,) = phase_summary(synthetic_run(), PHASES, start_s=5.0, only="b")
    assert late["requests"] == 50 and late["phase"] == "b"


def test_bins_cover_the_run() -> None:
    binned = bins(synthetic_run(), 5.0, 20.0)
    assert binned["t"] == [2.5, 7.5, 12.5, 17.5]
    assert binned["agreement"][:2] == [1.0, 1.0] and binned["saving"][2] == pytest.approx(0.5)
    assert binned["answered_per_s"][0] == 10.0 and binned["answered_per_s"][2] == 9.0


def test_first_move_after_finds_the_reaction() -> None:
    scrapes = [{"t": t, "threshold": 0.4 if t < 14 else 0.3} for t in range(20)]
    assert first_move_after(scrapes, 10.0, -1) == 4.0
    assert first_move_after(scrapes, 10.0, +1) is None
    assert first_move_after([], 10.0, -1) is None


def test_controller_metrics_reads_the_page() -> None:
    page = "\n".join(
        [
            "deebert_controller_threshold 0.25",
            'deebert_controller_agreement{bound="estimate",window="400"} 0.97',
            'deebert_controller_adjustments_total{reason="agreement_low"} 2.0',
            "deebert_controller_p99_seconds NaN",
            "deebert_layers_executed_total 12.0",
        ]
    )
    found = controller_metrics(page)
    assert found["threshold"] == 0.25 and found["agreement"] == {"400/estimate": 0.97}
    assert found["adjustments"] == {"agreement_low": 2.0} and found["p99_s"] is None
    assert found["deebert_layers_executed_total"] == 12.0
