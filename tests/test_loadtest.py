"""`deebert loadtest` and `deebert bench`: the pure pieces, then real servers on a tiny checkpoint."""

from __future__ import annotations

import argparse
import asyncio
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from deebert.cli import main
from loadtest.bench import PARTS, parse_wrk, write_results
from loadtest.generator import LoadConfig, Workload, parse_threshold_mix, poisson_schedule, run
from loadtest.peers import PeerSettings, best_plain, markdown_section, run_peers
from loadtest.records import DROPPED, RequestRecord, RunResult, metric_total, parse_metrics
from loadtest.report import build_report, format_report, metrics_batch_size, metrics_saving
from loadtest.saturation import is_saturated, saturated_throughput, sustained
from loadtest.servers import deebert_server_command, free_port, plain_server_command, running_server
from model.checkpoint import save_model
from model.saving import exit_counts, expected_saving
from tests.helpers import assert_same_answer, sentiment_rows, tiny_model, write_tsv

# --- pure pieces ---------------------------------------------------------------------------------------


def test_threshold_mix_parses_numbers_presets_and_weights() -> None:
    assert parse_threshold_mix("0").values == ("0",)
    assert parse_threshold_mix(" balanced ").values == ("balanced",)
    mix = parse_threshold_mix("0:0.5,balanced:0.3,fast:0.2")
    assert mix.values == ("0", "balanced", "fast")
    assert mix.weights == pytest.approx((0.5, 0.3, 0.2))
    assert parse_threshold_mix("0.25:2,fast:6").weights == pytest.approx((0.25, 0.75))
    assert parse_threshold_mix("0,fast").weights == pytest.approx((0.5, 0.5))
    rng = random.Random(0)
    picks = [mix.pick(rng) for _ in range(20_000)]
    assert picks.count("0") / len(picks) == pytest.approx(0.5, abs=0.02)
    assert picks.count("fast") / len(picks) == pytest.approx(0.2, abs=0.02)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "empty threshold spec"),
        ("0,,fast", "empty part"),
        ("0:abc", "'abc' is not a number"),
        ("0:", "is not a number"),
        ("0:-1", "weight must be a number > 0"),
        ("fast:0", "weight must be a number > 0"),
        ("-0.5", "finite number >= 0"),
        ("inf", "finite number >= 0"),
        ("bal anced", "neither a number >= 0 nor a preset name"),
        ("0:0.5,fast:0.2,0:0.3", r"names \['0'\] more than once"),
    ],
)
def test_bad_threshold_specs_say_what_is_wrong(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_threshold_mix(spec)


def test_cli_rejects_a_bad_threshold_spec_with_its_reason(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["loadtest", "--data", "x.tsv", "--threshold", "0:-1"])
    assert exit_info.value.code == 2
    assert "weight must be a number > 0" in capsys.readouterr().err


def test_expected_saving_is_the_papers_formula() -> None:
    assert exit_counts([1, 4, 4, 2], 4) == [1, 1, 0, 2]
    assert expected_saving([1, 4, 4, 2], 4) == pytest.approx(1 - 11 / 16)
    assert expected_saving([4, 4], 4) == 0.0
    assert expected_saving([1] * 5, 4) == 0.75
    assert expected_saving([], 4) is None
    with pytest.raises(ValueError, match=r"outside 1\.\.4"):
        expected_saving([5], 4)


def test_poisson_schedule_is_seeded_and_has_the_right_mean() -> None:
    rate = 50.0
    schedule = poisson_schedule(rate, random.Random(7), count=20_000)
    assert schedule == poisson_schedule(rate, random.Random(7), count=20_000)
    assert len(schedule) == 20_000 and schedule == sorted(schedule)
    gaps = np.diff([0.0, *schedule])
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.03)
    assert gaps.std() == pytest.approx(1 / rate, rel=0.05)  # exponential: std equals mean
    timed = poisson_schedule(rate, random.Random(1), duration=2.0)
    assert all(t < 2.0 for t in timed) and 60 < len(timed) < 140
    assert len(poisson_schedule(rate, random.Random(1), count=5, duration=100.0)) == 5
    with pytest.raises(ValueError, match="rate"):
        poisson_schedule(0.0, random.Random(0), count=3)
    with pytest.raises(ValueError, match="count, a duration"):
        poisson_schedule(1.0, random.Random(0))


METRICS_PAGE = """\
# HELP deebert_layers_executed_total Sum of exit layers over texts
# TYPE deebert_layers_executed_total counter
deebert_layers_executed_total 5.0
deebert_layers_possible_total 8.0
deebert_requests_total{route="/v1/classify",status="200"} 2.0
deebert_requests_total{route="/v1/classify",status="429"} 1.0
deebert_exit_layer_bucket{le="+Inf"} 2.0
deebert_model_info{labels="a,b c",model="x{y}"} 1.0
"""


def test_metrics_page_parsing() -> None:
    samples = parse_metrics(METRICS_PAGE)
    assert metric_total(samples, "deebert_layers_executed_total") == 5.0
    assert metric_total(samples, "deebert_requests_total") == 3.0
    assert metric_total(samples, "deebert_missing") is None
    info = next(s for s in samples if s.name == "deebert_model_info")
    assert info.labels == {"labels": "a,b c", "model": "x{y}"}
    later = parse_metrics(METRICS_PAGE.replace("5.0", "9.0").replace("8.0", "16.0"))
    assert metrics_saving(samples, later)["expected_saving"] == pytest.approx(1 - 4 / 8)
    assert metrics_saving(samples, None)["expected_saving"] is None
    assert metrics_saving(parse_metrics("up 1\n"), parse_metrics("up 1\n"))["expected_saving"] is None
    assert parse_metrics("<html>not found</html>") == [], "a page that is not exposition text has no samples"


def test_mean_batch_size_from_two_scrapes() -> None:
    page = "deebert_batch_size_count {count}\ndeebert_batch_size_sum {texts}\n"
    before = parse_metrics(page.format(count=10.0, texts=40.0))
    after = parse_metrics(page.format(count=14.0, texts=100.0))
    assert metrics_batch_size(before, after) == pytest.approx(60 / 4)
    assert metrics_batch_size(before, before) is None  # no batch ran between them
    assert metrics_batch_size(before, None) is None
    assert metrics_batch_size(parse_metrics("up 1\n"), parse_metrics("up 1\n")) is None


def test_report_counts_errors_exits_and_server_overhead() -> None:
    records = [
        RequestRecord("200", 0.010, 2, "0", [4, 4], 4, total_ms=5.0, compute_ms=4.5, queue_ms=0.1, tokenization_ms=0.2),
        RequestRecord(
            "200", 0.020, 2, "fast", [1, 2], 4, total_ms=3.0, compute_ms=2.0, queue_ms=0.3, tokenization_ms=0.4
        ),
        RequestRecord("429", 0.001, 2, "fast"),
        RequestRecord("connect_error", 0.001, 2, "0"),
    ]
    config = LoadConfig(rate=10.0, duration=1.0, threshold="0,fast", progress=False)
    report = build_report(RunResult(config, records, 2.0, 1, 0.003, 0.9, None, None, None))
    assert report["requests_sent"] == 4 and report["requests_ok"] == 2
    assert report["errors"] == {"429": 1, "connect_error": 1, DROPPED: 1}
    assert report["exit_counts"] == [1, 1, 0, 2] and report["expected_saving"] == pytest.approx(1 - 11 / 16)
    assert report["metrics_expected_saving"] is None
    assert report["throughput_rps"] == 1.0 and report["texts_per_s"] == 2.0 and report["arrival_rps"] == 5.0
    timing = report["server_timing"]
    assert timing["overhead_ms"] == {"mean": 0.75, "p50": 0.75}
    # The overhead's parts, each request's own: tokenizing, queueing, and the rest (0.5-0.2-0.1, 1.0-0.4-0.3).
    assert timing["tokenization_ms"]["mean"] == pytest.approx(0.3) and timing["queue_ms"]["mean"] == pytest.approx(0.2)
    assert timing["overhead_rest_ms"]["mean"] == pytest.approx(0.25)
    assert "overhead: tokenizing / queue / rest (p50)" in format_report(report)
    assert report["per_threshold"]["fast"]["expected_saving"] == pytest.approx(1 - 3 / 8)
    assert "connect_error: 1" in format_report(report)


def test_bench_takes_a_subset_of_the_peers_variants_and_names_it_in_its_command() -> None:
    from loadtest.bench import add_arguments, settings_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    settings = settings_from_args(
        parser.parse_args(["--parts", "peers", "--peers-variants", "ort-plain, auto-balanced"])
    )
    assert settings.peers_variants == ["ort-plain", "auto-balanced"]
    assert "--peers-variants ort-plain,auto-balanced" in settings.command_line()
    assert "--peers-variants" not in settings_from_args(parser.parse_args([])).command_line()
    with pytest.raises(SystemExit):
        parser.parse_args(["--peers-variants", "ort-plain,warp-drive"])


def test_saturation_rules_and_wrk_parsing() -> None:
    def point(offered: float, achieved: float, p99: float, errors: float = 0.0) -> dict[str, object]:
        return {"arrival_rps": offered, "throughput_rps": achieved, "error_rate": errors, "requests_ok": 10,
                "latency_ms": {"p99": p99}}  # fmt: skip

    first = point(10, 10, 5)
    assert not is_saturated(point(20, 19, 20), first)
    assert is_saturated(point(40, 30, 20), first)  # achieved < 90% of offered
    assert is_saturated(point(40, 39, 51), first)  # p99 blew up
    assert is_saturated(point(40, 39, 5, errors=0.05), first)
    assert saturated_throughput([first, point(20, 19, 20), point(40, 35, 9, errors=0.2)]) == 19
    wrk = parse_wrk(
        "  Latency Distribution\n     50%  812.00us\n     99%   10.94ms\n"
        "  Non-2xx or 3xx responses: 3\nRequests/sec:    977.80\n"
    )
    assert wrk["throughput_rps"] == 977.8 and wrk["non_2xx"] == 3
    assert wrk["latency_ms"] == pytest.approx({"p50": 0.812, "p99": 10.94})


# --- real servers on a tiny checkpoint -----------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> Path:
    """A tiny checkpoint with presets, shared by this module's servers (each start costs seconds)."""
    from model.config import Preset

    model = tiny_model("bert")
    model.config = model.config.with_presets(
        [Preset("lossless", 0.05, 1.0, 0.1), Preset("balanced", 0.2, 0.9, 0.3), Preset("fast", 0.5, 0.8, 0.6)]
    )
    directory = tmp_path_factory.mktemp("loadtest") / "tiny-checkpoint"
    save_model(model, directory, tokenizer=tokenizer)
    return directory


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tsv(tmp_path_factory.mktemp("data") / "dev.tsv", ["sentence", "label"], sentiment_rows(40))


@pytest.fixture(scope="module")
def deebert_url(checkpoint: Path) -> Iterator[str]:
    port = free_port()
    env = {"DEEBERT_MAX_WAIT_MS": "1"}
    with running_server(deebert_server_command(str(checkpoint), port), env, port, startup_timeout=60) as url:
        yield url


def _check_consistent(report: dict[str, Any], texts_per_request: int) -> None:
    assert report["requests_sent"] == report["requests_ok"] and report["errors"] == {}
    assert sum(report["exit_counts"]) == report["texts_sent"] == texts_per_request * report["requests_sent"]
    assert report["metrics_expected_saving"] is not None
    assert report["expected_saving"] == pytest.approx(report["metrics_expected_saving"], abs=1e-9)
    assert report["metrics_mean_batch_size"] is not None and report["metrics_mean_batch_size"] >= 1
    latency = report["latency_ms"]
    assert latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]


def test_generator_against_a_real_server(deebert_url: str, data_file: Path, tmp_path: Path) -> None:
    workload = Workload.from_file(data_file)
    closed = run(
        LoadConfig(url=deebert_url, concurrency=3, requests=30, duration=30, threshold="0:0.5,balanced:0.3,fast:0.2",
                   texts_per_request=2, progress=False, warmup=2),
        workload,
    )  # fmt: skip
    assert closed["mode"] == "closed" and closed["requests_sent"] == 30
    _check_consistent(closed, 2)
    assert set(closed["per_threshold"]) == {"0", "balanced", "fast"}
    assert closed["per_threshold"]["0"]["expected_saving"] == 0.0
    assert closed["server_timing"]["total_ms"]["p50"] >= closed["server_timing"]["compute_ms"]["p50"] > 0

    opened = run(LoadConfig(url=deebert_url, rate=30, duration=1.5, threshold="fast", progress=False), workload)
    assert opened["mode"] == "open" and 20 <= opened["requests_sent"] <= 80
    _check_consistent(opened, 1)
    assert opened["dropped_by_client"] == 0 and opened["max_schedule_lag_ms"] is not None

    # The light raw HTTP/1.1 client sends the same seeded plan and reads the answers the same way.
    raw = run(
        LoadConfig(url=deebert_url, rate=30, duration=1.5, threshold="fast", progress=False, http_client="raw"),
        workload,
    )
    _check_consistent(raw, 1)
    assert raw["requests_sent"] == opened["requests_sent"] and raw["requests_ok"] == raw["requests_sent"]

    out = tmp_path / "report.json"
    argv = ["loadtest", "--url", deebert_url, "--data", str(data_file), "--requests", "5", "--threshold", "0",
            "--no-progress", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    written = json.loads(out.read_text())
    assert written["requests_ok"] == 5 and written["expected_saving"] == 0.0 and written["threshold"] == "0"


def test_plain_baseline_answers_like_full_depth(deebert_url: str, checkpoint: Path, data_file: Path) -> None:
    texts = ["the movie was great", "this film is awful", "i think the plot was really dull", "fun"]
    ours = httpx.post(f"{deebert_url}/v1/classify", json={"texts": texts}, headers={"X-Exit-Threshold": "0"}).json()
    for backend in ("torch", "onnxruntime"):
        port = free_port()
        argv = plain_server_command(str(checkpoint), port, None, backend=backend)
        with running_server(argv, {}, port, startup_timeout=60) as url:
            info = httpx.get(f"{url}/v1/model").json()
            plain = httpx.post(f"{url}/v1/classify", json={"texts": texts}, headers={"X-Exit-Threshold": "fast"}).json()
            report = run(LoadConfig(url=url, requests=5, duration=10, progress=False), Workload.from_file(data_file))
        assert info["backend"] == backend and info["baseline"] is True
        assert [r["label"] for r in plain["results"]] == [r["label"] for r in ours["results"]]
        for a, b in zip(plain["results"], ours["results"], strict=True):
            assert a["score"] == pytest.approx(b["score"], abs=1e-5)
            assert a["exit_layer"] == b["exit_layer"] == 4
        # The baseline has no /metrics: the generator goes on without the server-side check.
        assert report["requests_ok"] == 5 and report["metrics_expected_saving"] is None
        assert report["expected_saving"] == 0.0


def test_bench_measures_a_live_server_and_writes_its_report(checkpoint: Path, data_file: Path, tmp_path: Path) -> None:
    """The parts that need only deebert's own server, for real; the other parts are judged n/a, not failed."""
    md, results = tmp_path / "BENCH.md", tmp_path / "results"
    argv = ["bench", "--checkpoint", str(checkpoint), "--data", str(data_file), "--output-md", str(md),
            "--results-dir", str(results), "--quick", "--parts", "batch1,curve", "--duration-per-point", "0.5",
            "--batch1-duration", "0.5", "--saturation-concurrency", "4", "--warmup", "2", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    raw = json.loads((results / "bench.json").read_text())
    assert [r["threshold"] for r in raw["batch1"]["rows"]] == ["0", "lossless", "balanced", "fast"]
    for row in raw["batch1"]["rows"]:
        assert row["requests"] > 0 and row["mean_latency_ms"] >= row["mean_compute_ms"] > 0
        # Where the overhead goes, from the server's own headers.
        assert row["tokenization_p50_ms"] > 0 and row["queue_p50_ms"] >= 0 and row["overhead_rest_p50_ms"] is not None
    assert set(raw["curves"]) == {"full", "balanced"} and "plain" not in raw and "peers" not in raw
    for curve in raw["curves"].values():
        assert curve["points"] and curve["closed_loop"]["requests_ok"] > 0
        assert curve["closed_loop"]["metrics_expected_saving"] is not None
    # Judged: balanced vs full depth and the overhead; the three against a plain endpoint and the one against
    # the same runtime in process (the peers part) are n/a.
    statuses = [t["status"] for t in raw["targets"]]
    assert len(statuses) == 7 and {statuses[0], statuses[3]} <= {"PASS", "MISS"}
    assert [statuses[i] for i in (2, 4, 5, 6)] == ["n/a"] * 4
    text = md.read_text()
    for heading in ["## Machine", "## Targets", "## 1. Batch-1 latency", "## 2. Latency vs throughput"]:
        assert heading in text
    assert "## 6. Peer runtimes" not in text
    # The CPU time the hypervisor gave other guests, per part and over the run (Linux; None elsewhere).
    assert set(raw["cpu_stolen"]) == {"batch1,curve", "whole run"}
    if raw["cpu_stolen"]["whole run"] is not None:
        assert 0.0 <= raw["cpu_stolen"]["whole run"] <= 1.0
        assert "CPU time stolen by the hypervisor for other guests (steal, /proc/stat): batch1,curve " in text


def test_bench_report_of_a_recorded_full_run(tmp_path: Path) -> None:
    """Every part's section, the targets and the plots, from the committed full run BENCHMARKS.md cites
    (running every part here would start five servers and three peer processes)."""
    recorded = json.loads((Path(__file__).parents[1] / "loadtest/results/bench.json").read_text())
    assert set(recorded["settings"]["parts"]) == set(PARTS)
    results_dir, md = tmp_path / "results", tmp_path / "BENCH.md"
    results_dir.mkdir()
    written = write_results(recorded, results_dir, md)
    assert [t["status"] in {"PASS", "MISS"} for t in written["targets"]] == [True] * 7
    # Issue 24's server targets: the overhead at 0.25 ms, and the server against the same runtime in process.
    overhead, in_process = written["targets"][3], written["targets"][6]
    assert overhead["name"].endswith("threshold 0") and "target <= 0.25 ms" in overhead["detail"]
    assert "onnxruntime-fp32+openvino-bf16, peers' auto-balanced" in in_process["name"]
    per_s = written["peers"]["variants"]["auto-balanced"]["batched_sentences_per_s"]
    assert in_process["value"] == pytest.approx(sustained(written["curves"]["balanced"]) / per_s)
    # The best plain endpoint is the plain variant the peers found fastest at batch 1.
    assert written["plain_best_runtime"]["variant"] == best_plain(written["peers"]["variants"])["batch1"]
    text = md.read_text()
    headings = ["## Machine", "## Targets", "## 1. Batch-1 latency", "## 2. Latency vs throughput", "## 3. Baseline",
                "## 3b. Baseline: the plain endpoint on the best plain runtime", "## 4. Compaction vs none",
                "## 5. Cross-check", "## 6. Peer runtimes", "deebert bench --checkpoint"]  # fmt: skip
    for heading in headings:
        assert heading in text
    balanced = next(r for r in recorded["batch1"]["rows"] if r["threshold"] == "balanced")
    parts = " / ".join(f"{balanced[k]:.3f}" for k in ("tokenization_p50_ms", "queue_p50_ms", "overhead_rest_p50_ms"))
    assert f"| {balanced['overhead_p50_ms']:.3f} | {parts} |" in text, "the overhead and its parts, per threshold"
    # A run recorded before the server sent X-Tokenization-Time: its parts read n/a.
    for row in recorded["batch1"]["rows"]:
        del row["tokenization_p50_ms"], row["queue_p50_ms"], row["overhead_rest_p50_ms"]
    write_results(recorded, results_dir, md)
    assert "| n/a / n/a / n/a |" in md.read_text()
    for name in ("latency_throughput.png", "batch1_saving.png"):
        assert (results_dir / name).stat().st_size > 1000
        assert f"results/{name}" in text
    assert json.loads((results_dir / "bench.json").read_text())["targets"] == written["targets"]
    assert "CPU time stolen" not in text, "a run recorded before steal was read says nothing of it"
    recorded["cpu_stolen"] = {"peers": 0.031, "plain-best": None, "whole run": 0.012}
    write_results(recorded, results_dir, md)
    assert "(steal, /proc/stat): peers 3.1%, plain-best -, whole run 1.2%." in md.read_text()


def test_quick_peers_run_each_variant_in_its_own_process(checkpoint: Path, data_file: Path, tmp_path: Path) -> None:
    """The peers part as `deebert bench --quick` runs it: three variants, each in its own process."""
    settings = PeerSettings(
        checkpoint=str(checkpoint), data=str(data_file), threads=2, batch1_rows=10, rounds=1, progress=False,
        cache_dir=str(tmp_path / "cache"), variants=("torch-plain", "ort-plain", "ort-balanced"),
    )  # fmt: skip
    peers = run_peers(settings, log_path=tmp_path / "peers.log")
    assert set(peers["variants"]) == {"torch-plain", "ort-plain", "ort-balanced"} and not peers["skipped"]
    assert peers["samples"] == {"batch1": 10, "batched": 40}
    assert peers["cpu_stolen"] is None or 0.0 <= peers["cpu_stolen"] <= 1.0
    for variant in peers["variants"].values():
        assert variant["batch1_mean_ms"] > 0 and variant["batched_sentences_per_s"] > 0
        assert 0.0 <= variant["accuracy"] <= 1.0 and len(variant["batched_labels"]) == 40
    # fp32 on ONNX Runtime answers as PyTorch does, alone or batched: labels may differ only on a near tie,
    # whose side depends on the CPU's float arithmetic (at most one sentence here).
    ort, torch_plain = peers["variants"]["ort-plain"], peers["variants"]["torch-plain"]
    assert abs(ort["accuracy"] - torch_plain["accuracy"]) <= 1 / peers["samples"]["batched"] + 1e-9
    assert ort["batch1_vs_batched_label_agreement"] >= 1 - 1 / peers["samples"]["batch1"] - 1e-9
    assert peers["variants"]["ort-balanced"]["expected_saving_batched"] >= 0.0
    # deebert variants also run the server's batches (data order, split), what `deebert tune` times: same answers.
    balanced = peers["variants"]["ort-balanced"]
    assert balanced["server_sentences_per_s"] > 0 and len(balanced["server_rounds_s"]) == 1
    assert balanced["server_vs_batched_label_agreement"] >= 1 - 1 / peers["samples"]["batched"] - 1e-9
    assert "server_sentences_per_s" not in ort, "plain variants run no exit loop to split"
    assert peers["best_plain"]["batch1"] in {"torch-plain", "ort-plain"}
    assert {t["status"] for t in peers["targets"]} <= {"PASS", "MISS", "n/a"}
    peers["cpu_stolen"] = 0.042
    assert "stolen by the hypervisor for other guests during the run: 4.2%." in "\n".join(markdown_section(peers))


# --- deebert reliability: the report logic (the runs themselves are documented, not tested) -------------


def _record(status: str, latency_s: float, sent_at: float, **extra: Any) -> RequestRecord:
    return RequestRecord(status, latency_s, 1, None, sent_at=sent_at, **extra)


def _reliability_report(mode: str, records: list[RequestRecord], **overrides: Any) -> dict[str, Any]:
    from loadtest.reliability import ReliabilitySettings
    from loadtest.reliability_checks import BOUND_FORMULA, classify_records, latency_bound_ms, windows

    settings = ReliabilitySettings(mode=mode, duration=5)  # type: ignore[arg-type]
    mib = 2**20
    probe = {"requests": 10, "ok": 10, "statuses": {"200": 10}, "p50_ms": 8.0, "p99_ms": 12.0}
    state = {"ready_status": 200, "queue_depth": 0.0, "inflight_requests": 0.0, "probe": probe}
    report: dict[str, Any] = {
        "mode": mode,
        "command": settings.command_line(),
        "settings": {"idle": 5.0, "threshold": None, "window": 1.0},
        "machine": {"cpu": "Test CPU", "cpu_count": 2, "cpus_usable": 2, "versions": {"torch": "2.13.0"}},
        "started": "2026-01-01T00:00:00+00:00",
        "finished": "2026-01-01T00:01:00+00:00",
        "server_env": {"DEEBERT_MAX_QUEUE_SIZE": "64"},
        "model": {"model": "tiny", "num_layers": 4},
        "capacity": {"throughput_rps": 100.0, "concurrency": 32, "duration_s": 10.0},
        "service_time": {"batch_size": 8, "samples": 20, "p50_ms": 10.0, "p90_ms": 11.0},
        "latency_bound": {
            "formula": BOUND_FORMULA,
            "max_queue_size": 64,
            "max_batch_size": 8,
            "full_batch_ms": 10.0,
            "bound_ms": latency_bound_ms(64, 8, 10.0),
        },
        "load": {"offered_rps": 300.0, "share_of_capacity": 3.0, "duration_s": 5.0, "max_schedule_lag_s": 0.002}
        | {"accepted_rps": 90.0},
        "outcome": classify_records(records),
        "rss": {"before": 500 * mib, "peak": 540 * mib, "end": 515 * mib, "after": 510 * mib},
        "windows": windows(records, 1.0, [(100.2, 500 * mib), (101.5, 530 * mib)], start=100.0),
        "before": state,
        "after": json.loads(json.dumps(state)),
    }
    report.update(overrides)
    return report


def test_reliability_sorts_answers_into_accepted_refused_failed_and_lost() -> None:
    from loadtest.reliability_checks import classify_records

    records = [
        _record("200", 0.010, 100.1, total_ms=4.0),
        _record("200", 0.030, 100.2, total_ms=6.0),
        _record("429", 0.001, 100.3, retry_after="1"),
        _record("429", 0.001, 100.4),
        _record("503", 0.002, 100.5),
        _record("bad_response", 0.002, 100.6),
        _record("read_timeout", 60.0, 100.7),
        _record("connect_error", 0.001, 100.8),
    ]
    outcome = classify_records(records, client_dropped=3)
    assert (outcome["sent"], outcome["accepted"], outcome["refused"]) == (8, 2, 2)
    assert outcome["refused_without_retry_after"] == 1
    assert outcome["failed"] == 2 and outcome["failed_by_status"] == {"503": 1, "bad_response": 1}
    assert outcome["server_errors_5xx"] == 1
    assert outcome["lost"] == 2 and outcome["lost_by_kind"] == {"connect_error": 1, "read_timeout": 1}
    assert outcome["client_dropped"] == 3
    assert outcome["latency_accepted_ms"]["p50"] == pytest.approx(20.0)  # only the accepted count
    assert outcome["server_latency_accepted_ms"]["max"] == 6.0


def test_reliability_bound_windows_and_checks() -> None:
    from loadtest.reliability_checks import evaluate_checks, latency_bound_ms, windows

    assert latency_bound_ms(1024, 32, 200.0) == pytest.approx(34 * 200.0)  # running + 32 queued + its own
    good = [_record("200", 0.05, 100.0 + i / 10, total_ms=40.0) for i in range(20)]
    refused = [_record("429", 0.001, 100.05 + i / 10, retry_after="2") for i in range(10)]
    report = _reliability_report("overload", good + refused)
    assert [w["sent"] for w in report["windows"]] == [20, 10]
    assert report["windows"][1]["rss_peak_mib"] == 530.0
    late = [*good, _record("200", 0.05, 102.01, total_ms=40.0)]  # sent just past the end: joins the last window
    assert [w["sent"] for w in windows(late, 1.0, [], start=100.0, duration_s=2.0)] == [10, 11]
    checks = {c["name"]: c for c in evaluate_checks(report)}
    assert all(c["passed"] for c in checks.values()), [c for c in checks.values() if not c["passed"]]
    assert "p99 40.0 ms vs bound 100.0 ms" in checks["p99 within the queue bound"]["detail"]
    client_check = checks["client p99 within the bound plus the generator's lag"]
    assert "p99 from the scheduled arrival 50.0 ms vs 100.0 ms + 2 ms" in client_check["detail"]

    broken = [
        *good[:10],
        _record("200", 0.5, 100.3, total_ms=200.0),  # over the 100 ms bound
        _record("429", 0.001, 100.4),  # no Retry-After
        _record("500", 0.01, 100.5),
        _record("remote_protocol_error", 0.01, 100.6),
    ]
    report = _reliability_report("overload", broken, rss={"before": 100, "peak": 130, "end": 120, "after": 106})
    report["after"]["ready_status"] = 503
    failed = {c["name"] for c in evaluate_checks(report) if not c["passed"]}
    assert failed == {
        "only 2xx and 429",
        "every 429 has Retry-After",
        "zero 5xx",
        "nothing lost",
        "p99 within the queue bound",
        "client p99 within the bound plus the generator's lag",
        "RSS back to baseline",
        "healthy after",
    }


def test_reliability_soak_checks_growth_and_every_window() -> None:
    from loadtest.reliability_checks import evaluate_checks, soak_rss_growth, windows

    mib = 2**20
    records = [_record("200", 0.02, 100.0 + i / 10, total_ms=15.0) for i in range(30)]
    # The load's working set arrives in the first window (500 → 520 MiB); after that RSS holds (+1%).
    steady = [(100.1, 500 * mib), (100.5, 520 * mib), (100.9, 521 * mib), (102.2, 524 * mib), (102.6, 525 * mib)]
    flat = windows(records, 1.0, steady, start=100.0)
    assert [w["rss_median_mib"] for w in flat] == [520.0, None, 525.0]
    assert soak_rss_growth(flat) == (520.0, 525.0, pytest.approx(5 / 520))
    checks = {c["name"]: c for c in evaluate_checks(_reliability_report("soak", records, windows=flat))}
    assert all(c["passed"] for c in checks.values()), [c for c in checks.values() if not c["passed"]]
    # Idle 500 MiB → end 515 MiB is the working set, reported beside the growth, not counted as growth.
    assert "520.0 MiB in the first window, 525.0 MiB in the last (+1.0%)" in checks["RSS growth under 5%"]["detail"]
    assert "idle before the load 500.0 MiB" in checks["RSS growth under 5%"]["detail"]
    records[-1] = _record("200", 0.5, 102.9, total_ms=150.0)  # one slow answer in the last window
    records[0] = _record("429", 0.001, 100.0, retry_after="1")  # refused at 70%: an error for a soak
    creeping = windows(records, 1.0, [*steady[:3], (102.2, 560 * mib), (102.6, 566 * mib)], start=100.0)
    report = _reliability_report("soak", records, windows=creeping)
    failed = {c["name"] for c in evaluate_checks(report) if not c["passed"]}
    assert failed == {
        "no errors",
        "RSS growth under 5%",
        "p99 within the queue bound",
        "client p99 within the bound plus the generator's lag",
        "every window's p99 within the bound",
    }


def test_reliability_markdown_names_command_and_machine_per_mode(tmp_path: Path) -> None:
    from loadtest.reliability_checks import evaluate_checks
    from loadtest.reliability_report import format_summary, write_markdown

    records = [_record("200", 0.05, 100.0 + i / 10, total_ms=40.0) for i in range(20)]
    report = _reliability_report("overload", [*records, _record("429", 0.001, 100.5, retry_after="1")])
    report["checks"] = evaluate_checks(report)
    (tmp_path / "reliability_overload.json").write_text(json.dumps(report))
    markdown = tmp_path / "RELIABILITY.md"
    write_markdown(tmp_path, markdown)
    text = markdown.read_text()
    assert "## Overload: 3 x capacity for 5 s" in text and "**Short run** (5 s instead of 60 s)" in text
    assert "`deebert reliability overload --duration 5`" in text and "Test CPU (2 usable of 2 CPUs)" in text
    assert "| 21 | 20 | 1 (0 without Retry-After) | 0 | 0 | 0 |" in text
    assert "= 10 x 10.0 ms = **100 ms**" in text
    assert "Not run yet: `deebert reliability soak`" in text
    assert "PASS  p99 within the queue bound" in format_summary(report)


def test_raw_client_reads_answers_and_errors_like_httpx(deebert_url: str) -> None:
    from loadtest.rawhttp import RawClient

    async def exchange() -> list[Any]:
        client = RawClient(deebert_url, timeout=10, max_connections=2)
        try:
            return [
                await client.post("/v1/classify", json={"text": "a fine film"}, headers={}),
                await client.post("/v1/classify", json={"texts": []}, headers={"X-Exit-Threshold": "0"}),
                await client.post("/v1/classify", json={"text": "é ü 中文"}, headers={"X-Exit-Threshold": "0"}),
            ]
        finally:
            await client.aclose()

    ok, bad, unicode = asyncio.run(exchange())
    reference = httpx.post(f"{deebert_url}/v1/classify", json={"text": "a fine film"}, timeout=10)
    assert ok.status_code == 200
    assert_same_answer(ok.json()["results"], reference.json()["results"])
    assert ok.headers.get("x-total-time") is not None
    assert bad.status_code == 422 and bad.json()["error"] and bad.json()["error_type"]
    assert unicode.status_code == 200 and unicode.json()["results"][0]["exit_layer"] >= 1
