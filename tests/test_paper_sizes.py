"""`python -m benchmarks.paper_sizes` on a tiny shape: the replayed exits land where recorded, and the report holds
batch 1 and every batch size asked for, on PyTorch named by its dtype (the runtime a GPU run uses)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks import exit_loop_profile, paper_sizes
from tests.helpers import sentiment_rows, write_tsv

TINY_SHAPE = {"num_hidden_layers": 4, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64}


def test_the_replay_criterion_leaves_at_the_recorded_layer() -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(paper_sizes.SHAPES, "tiny", TINY_SHAPE)
        model = paper_sizes.random_deebert("tiny", vocab_size=120)
    input_ids = torch.randint(5, 120, (5, 9))
    mask = torch.ones_like(input_ids)
    targets = [1.0, 3.0, 4.0, 2.0, 0.0]  # 0: full depth
    result = model.infer(input_ids, mask, None, targets, criterion=paper_sizes.ReplayCriterion())
    assert result.exit_layer == [1, 3, 4, 2, 4]
    alone = model.infer(input_ids[1:2], mask[1:2], None, [3.0], criterion=paper_sizes.ReplayCriterion())
    assert alone.exit_layer == [3], "the batch-1 path replays the same layer"


@pytest.fixture
def dev_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """16 sentences of 5 lengths, with the tiny shape available to the benchmarks."""
    monkeypatch.setitem(paper_sizes.SHAPES, "tiny", TINY_SHAPE)
    rows = [[text + " and then" * (i % 5), label] for i, (text, label) in enumerate(sentiment_rows(16))]
    return write_tsv(tmp_path / "dev.tsv", ["sentence", "label"], rows)


def test_the_benchmark_reports_batch1_and_each_batch_size(
    tiny_checkpoint: Path, tmp_path: Path, dev_data: Path
) -> None:
    data = dev_data
    output = tmp_path / "sizes.json"
    argv = ["--checkpoint", str(tiny_checkpoint), "--data", str(data), "--shapes", "tiny", "--runtimes"]
    argv += ["torch-float32", "--device", "cpu", "--exits-backend", "torch", "--threads", "1", "--batch1-rows", "3"]
    argv += ["--batch-size", "2,4", "--batched-rows", "8", "--rounds", "1", "--output", str(output)]
    assert paper_sizes.main(argv) == 0
    report = json.loads(output.read_text())
    assert report["command"] == "python -m benchmarks.paper_sizes " + " ".join(argv)
    assert report["accuracy"].startswith("not measured")
    figures = report["shapes"]["tiny"]["torch-float32"]
    assert figures["device"] == "cpu"
    assert figures["batch1_full_ms"] > 0 and figures["batch1_exit_ms"] > 0
    assert 0 <= figures["batch1_expected_saving"] < 1 and 0 <= figures["batched_expected_saving"] < 1
    for size in (2, 4):
        assert figures[f"batch{size}_full_per_s"] > 0 and figures[f"batch{size}_exit_per_s"] > 0
        assert f"batch{size}_measured_over_expected" in figures
    assert "batch32_full_per_s" not in figures, "only the sizes asked for"


def test_a_torch_runtime_is_named_by_its_dtype(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(paper_sizes.SHAPES, "tiny", TINY_SHAPE)
    data = write_tsv(tmp_path / "dev.tsv", ["sentence", "label"], [list(row) for row in sentiment_rows(4)])
    argv = ["--checkpoint", str(tiny_checkpoint), "--data", str(data), "--shapes", "tiny", "--runtimes"]
    argv += ["torch-fp32", "--exits-backend", "torch", "--threads", "1", "--output", str(tmp_path / "x.json")]
    with pytest.raises(SystemExit, match="named by dtype"):
        paper_sizes.main(argv)


def test_the_exit_loop_profile_counts_both_paths_on_the_cpu(
    tiny_checkpoint: Path, tmp_path: Path, dev_data: Path
) -> None:
    data = dev_data
    output = tmp_path / "profile.json"
    argv = ["--checkpoint", str(tiny_checkpoint), "--data", str(data), "--shape", "tiny", "--device", "cpu"]
    argv += ["--dtype", "float32", "--batch-size", "4", "--batches", "2", "--calls", "2", "--threads", "1"]
    assert exit_loop_profile.main([*argv, "--output", str(output)]) == 0
    report = json.loads(output.read_text())
    assert report["batches"] == [4, 4] and report["device"] == "cpu"
    assert report["accuracy"].startswith("not measured")
    for path in ("full_depth", "exit_loop"):
        figures = report[path]
        assert len(figures["wall_ms"]) == 2 and figures["wall_ms_median"] > 0
        assert figures["device_busy_ms_per_call"] is None, "no accelerator: no device time claimed"
        ops = {op["op"] for op in figures["top_host_ops"]}
        assert "aten::addmm" in ops or "aten::linear" in ops or "aten::mm" in ops, ops
    assert report["exit_over_full_wall"] == pytest.approx(
        report["exit_loop"]["wall_ms_median"] / report["full_depth"]["wall_ms_median"]
    )
