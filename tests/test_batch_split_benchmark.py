"""`python -m benchmarks.batch_split` on a tiny checkpoint: every split setting measured, the report written."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import batch_split
from tests.helpers import sentiment_rows, write_tsv


def test_the_benchmark_measures_every_split_setting_and_writes_its_report(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    rows = [[text + " and then" * (i % 7), label] for i, (text, label) in enumerate(sentiment_rows(40))]
    data = write_tsv(tmp_path / "dev.tsv", ["sentence", "label"], rows)
    output = tmp_path / "split.json"
    argv = ["--checkpoint", str(tiny_checkpoint), "--data", str(data), "--backend", "torch", "--batch-size", "8"]
    argv += ["--split-tokens", "0,4", "--rounds", "2", "--cache-dir", str(tmp_path / "cache")]
    assert batch_split.main([*argv, "--output", str(output), "--no-progress"]) == 0
    report = json.loads(output.read_text())
    assert report["texts"] == 40 and report["backend"] == "torch" and len(report["rounds"]) == 2
    assert report["command"].startswith("python -m benchmarks.batch_split --checkpoint")
    summary = report["summary"]
    assert summary["sorted_texts_per_s"] > 0 and summary["arrival_split_0_texts_per_s"] > 0
    assert summary["arrival_split_4_texts_per_s"] > 0
    assert summary["arrival_padding_share"] > summary["sorted_padding_share"], "arrival order pads more"
    for figures in report["rounds"]:
        assert figures["arrival_split_0_calls_per_batch"] == 1.0
        assert figures["arrival_split_4_calls_per_batch"] > 1.0, "texts of 5 to 17 tokens: worth splitting at 4"
