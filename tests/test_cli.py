"""`deebert calibrate` and `deebert evaluate` on a tiny checkpoint: files, fields, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deebert.cli import main
from model.checkpoint import load_model
from tests.helpers import sentiment_rows, write_tsv


def test_calibrate_then_evaluate_writes_the_report(tiny_checkpoint: Path, tmp_path: Path) -> None:
    dev = write_tsv(tmp_path / "dev.tsv", ["sentence", "label"], sentiment_rows(40))
    assert main(["calibrate", "--checkpoint", str(tiny_checkpoint), "--data", str(dev), "--no-progress"]) == 0
    presets = {p.name: p for p in load_model(tiny_checkpoint).config.presets}
    assert set(presets) == {"lossless", "balanced", "fast"}
    assert presets["lossless"].threshold <= presets["balanced"].threshold <= presets["fast"].threshold
    out = tmp_path / "eval"
    code = main(
        ["evaluate", "--checkpoint", str(tiny_checkpoint), "--data", str(dev), "--output", str(out),
         "--thresholds", "0,0.1,fast,10", "--timing-samples", "5", "--no-progress"]
    )  # fmt: skip
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["num_layers"] == 4 and report["num_samples"] == 40
    assert len(report["per_layer_accuracy"]) == 4
    assert report["full_accuracy"] == report["per_layer_accuracy"][-1]
    thresholds = [p["threshold"] for p in report["sweep"]]
    assert {0.0, 0.1, presets["fast"].threshold, 10.0} <= set(thresholds) and thresholds == sorted(thresholds)
    assert all(p["threshold"] in thresholds and p["measured_saving"] is not None for p in report["presets"])
    for point in report["sweep"]:
        assert set(point) == {"threshold", "accuracy", "expected_saving", "measured_saving", "exit_counts", "f1"}
        assert sum(point["exit_counts"]) == 40
    assert report["sweep"][0]["exit_counts"] == [0, 0, 0, 40] and report["sweep"][0]["expected_saving"] == 0.0
    assert report["sweep"][-1]["exit_counts"] == [40, 0, 0, 0] and report["sweep"][-1]["expected_saving"] == 0.75
    assert set(report["latency_ms"]) >= {"plain_full_forward", "exit_loop_threshold_0"}
    # Off-ramps beyond the final classifier: none at full depth (skipped), none when all leave at layer 1.
    extra = report["timing"]["extra_off_ramps_per_sample"]
    assert len(extra) == len(thresholds) and extra[0] == 0.0 and extra[-1] == 0.0
    if len(set(extra)) > 1:  # something to fit the cost of an off-ramp against
        assert set(report["timing"]["exit_costs"]) >= {"off_ramp_ms", "unsaved_fraction"}
    assert set(report["oracle"]) == {"accuracy", "expected_saving"}
    assert [p["name"] for p in report["presets"]] == ["lossless", "balanced", "fast"]
    assert report["presets"][0]["accuracy"] == pytest.approx(presets["lossless"].accuracy)
    for name in ("sweep.csv", "fig2_accuracy_vs_saving.png", "fig3_expected_vs_measured_saving.png",
                 "fig4_per_layer_accuracy.png", "fig6_exit_distribution.png"):  # fmt: skip
        assert (out / name).stat().st_size > 0
    assert (out / "sweep.csv").read_text().splitlines()[0].startswith("threshold,accuracy,expected_saving")


def test_calibrate_and_evaluate_another_exit_criterion(tiny_checkpoint: Path, tmp_path: Path) -> None:
    dev = write_tsv(tmp_path / "dev.tsv", ["sentence", "label"], sentiment_rows(40))
    out = tmp_path / "eval"
    args = ["--checkpoint", str(tiny_checkpoint), "--data", str(dev), "--no-progress"]
    # Evaluating another criterion leaves the checkpoint alone and reports no (entropy) presets.
    assert main(["evaluate", *args, "--criterion", "max-prob", "--output", str(out), "--timing-samples", "3"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["exit_criterion"] == "max-prob" and report["presets"] == []
    assert report["sweep"][0]["threshold"] == 1.0 and report["sweep"][0]["expected_saving"] == 0.0
    assert [c["name"] for c in report["calibrated_on_this_data"]] == ["lossless", "balanced", "fast"]
    assert load_model(tiny_checkpoint).config.exit_criterion == "entropy"
    # Calibrating it makes it the checkpoint's criterion, with whole-number patience presets.
    assert main(["calibrate", *args, "--criterion", "patience"]) == 0
    config = load_model(tiny_checkpoint).config
    assert config.exit_criterion == "patience"
    assert all(float(p.threshold).is_integer() for p in config.presets)
    assert main(["evaluate", *args, "--output", str(out), "--thresholds", "0,2,balanced", "--timing-samples", "3"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["exit_criterion"] == "patience" and len(report["presets"]) == 3
    assert main(["evaluate", *args, "--output", str(out), "--thresholds", "1.5"]) == 2  # not a whole number


def test_cli_errors_are_clear_and_exit_2(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing"
    assert main(["evaluate", "--checkpoint", str(missing), "--data", "x.tsv", "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad_column = write_tsv(tmp_path / "bad.tsv", ["review", "label"], [["good", "1"]])
    assert main(["calibrate", "--checkpoint", str(tiny_checkpoint), "--data", str(bad_column), "--no-progress"]) == 2
    assert "no text column" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(tiny_checkpoint), "--data", "x.tsv", "--thresholds", "0,warp"]) == 2
    assert "neither a number nor a preset" in capsys.readouterr().err
    pairs = write_tsv(tmp_path / "pairs.tsv", ["sentence1", "sentence2", "label"], [["a", "b", "1"]])
    assert main(["calibrate", "--checkpoint", str(tiny_checkpoint), "--data", str(pairs), "--no-progress"]) == 2
    assert "single sentences" in capsys.readouterr().err


def test_cold_shapes_times_first_and_repeated_forwards(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from benchmarks.cold_shapes import main as cold_shapes

    out = tmp_path / "cold.json"
    args = ["--checkpoint", str(tiny_checkpoint), "--device", "cpu", "--batch-sizes", "1,2"]
    assert cold_shapes([*args, "--min-length", "6", "--max-length", "14", "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["batch_size"] for r in report["results"]] == [1, 2]
    assert all(r["lengths"] == [6, 10, 14] and r["variant"] == "default" for r in report["results"])
    assert all(ms > 0 for r in report["results"] for ms in r["first_ms"] + r["repeat_ms"])
    assert report["command"].startswith("python -m benchmarks.cold_shapes --checkpoint")
    assert "batch   2: first" in capsys.readouterr().out


def test_off_ramp_profile_times_every_step(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from benchmarks.off_ramp_profile import main as profile

    dev = write_tsv(tmp_path / "dev.tsv", ["sentence", "label"], sentiment_rows(6))
    args = ["--checkpoint", str(tiny_checkpoint), "--data", str(dev), "--samples", "3", "--rounds", "2"]
    assert profile(args) == 0
    out = capsys.readouterr().out
    steps = ("pooling", "dense", "dense (weight already in cache)", "tanh + classifier", "entropy", "exit decision")
    lines = out.splitlines()
    for step in (*steps, "logits to Python (host sync)", "fp32 x @ W", "fp32 F.linear"):
        timed = [line for line in lines if line.startswith(f"  {step} ")]
        assert timed and all(" µs  (" in line for line in timed), step
    assert "3 samples × 2 rounds" in out


def test_classify_answers_every_text_in_input_order_as_one_batch_would(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """`deebert classify`: one JSON line per text, in input order, each the answer its text gets alone at the
    threshold; the summary counts exits, the saving and the accuracy of the file's labels."""
    from model.tokenization import load_tokenizer, pad_batch, tokenize

    rows = sentiment_rows(23)
    data = write_tsv(tmp_path / "texts.tsv", ["sentence", "label"], rows)
    output, summary_path = tmp_path / "answers.jsonl", tmp_path / "summary.json"
    args = ["classify", "--checkpoint", str(tiny_checkpoint), "--input", str(data), "--output", str(output),
            "--threshold", "balanced", "--batch-size", "4", "--backend", "torch", "--summary", str(summary_path),
            "--no-progress"]  # fmt: skip
    assert main(args) == 0
    answers = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(answers) == 23
    model, tokenizer = load_model(tiny_checkpoint), load_tokenizer(tiny_checkpoint)
    threshold = model.config.preset("balanced").threshold
    for (text, _), answer in zip(rows, answers, strict=True):
        one = pad_batch(tokenize(tokenizer, [text], None, model.config.max_length), tokenizer.pad_token_id)
        alone = model.infer(one.input_ids, one.attention_mask, one.token_type_ids, [threshold])
        assert (answer["label_id"], answer["exit_layer"]) == (alone.label[0], alone.exit_layer[0])
        assert answer["label"] == model.config.labels[alone.label[0]]
        assert answer["entropy"] == pytest.approx(alone.entropy[0], abs=1e-4)
        assert answer["score"] == pytest.approx(max(answer["probabilities"].values()))
    summary = json.loads(summary_path.read_text())
    assert summary["texts"] == 23 and summary["preset"] == "balanced" and summary["batch_size"] == 4
    assert summary["exit_counts"] == [sum(1 for a in answers if a["exit_layer"] == layer) for layer in range(1, 5)]
    gold = [model.config.labels.index(label) if label in model.config.labels else int(label) for _, label in rows]
    correct = sum(answer["label_id"] == label for answer, label in zip(answers, gold, strict=True))
    assert summary["accuracy"] == pytest.approx(correct / 23)
    assert 0.0 <= summary["expected_saving"] <= 0.75 and summary["backend"] == "torch"


def test_classify_refuses_bad_input_clearly(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_tsv(tmp_path / "texts.tsv", ["sentence"], [["a good film"], ["dull"]])
    base = ["classify", "--checkpoint", str(tiny_checkpoint), "--input", str(data), "--output", str(tmp_path / "o"),
            "--backend", "torch", "--no-progress"]  # fmt: skip
    assert main([*base, "--threshold", "warp"]) == 2
    assert "neither a number nor a preset" in capsys.readouterr().err
    assert main([*base, "--batch-size", "0"]) == 2
    assert "--batch-size must be at least 1" in capsys.readouterr().err
    pairs = write_tsv(tmp_path / "pairs.tsv", ["sentence1", "sentence2"], [["a", "b"]])
    assert main([*base[:4], str(pairs), *base[5:]]) == 2
    assert "unknown column(s) ['sentence']" in capsys.readouterr().err  # the checkpoint's text column
    assert main([*base, "--threshold", "0"]) == 0  # full depth, and no labels in the file: no accuracy
    assert [json.loads(line)["exit_layer"] for line in (tmp_path / "o").read_text().splitlines()] == [4, 4]
