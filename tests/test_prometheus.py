"""A real Prometheus scraping a real server: the recorded saving equals the saving the responses show.

Needs the `prometheus` and `promtool` binaries (Debian: `apt-get install prometheus`, as .ci/run does);
each test is skipped with the reason when they are absent.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from loadtest.generator import LoadConfig, Workload, run
from loadtest.servers import deebert_server_command, free_port, running_server
from tests.deploy_helpers import DEPLOY, PROMETHEUS_CONFIG, RULES, dashboard_queries, load_yaml, recording_rules
from tests.helpers import sentiment_rows, write_tsv

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None, reason="the prometheus binary is not installed (apt-get install prometheus)"
)
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (apt-get install prometheus)")
SAVING_1M = "job:deebert_expected_saving:ratio_rate1m"
SAVING_5M = "job:deebert_expected_saving:ratio_rate5m"


@needs_promtool
def test_promtool_accepts_the_rules_and_the_config_and_the_rule_unit_tests_pass() -> None:
    assert PROMTOOL is not None
    for command in (
        ["check", "rules", str(RULES)],
        ["check", "config", str(PROMETHEUS_CONFIG)],
        ["test", "rules", str(DEPLOY / "prometheus" / "rules.test.yml")],
    ):
        done = subprocess.run([PROMTOOL, *command], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"promtool {' '.join(command)}:\n{done.stdout}{done.stderr}"
        assert "SUCCESS" in done.stdout


def prometheus_config(target: str, directory: Path) -> Path:
    """deploy/prometheus/prometheus.yml with our one target and 1 s scrapes and rule evaluations."""
    config = load_yaml(PROMETHEUS_CONFIG)
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(RULES)]
    (job,) = config["scrape_configs"]
    job.pop("dns_sd_configs")
    job["static_configs"] = [{"targets": [target]}]
    path = directory / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


@contextlib.contextmanager
def running_prometheus(config: Path, directory: Path) -> Iterator[str]:
    """A Prometheus on loopback with its own storage in `directory`; its URL once ready."""
    assert PROMETHEUS is not None
    port = free_port()
    argv = [
        PROMETHEUS,
        f"--config.file={config}",
        f"--storage.tsdb.path={directory / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
    ]
    log = (directory / "prometheus.log").open("wb")
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, f"prometheus exited:\n{(directory / 'prometheus.log').read_text()}"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, "prometheus was not ready after 30 s"
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        log.close()


def query(url: str, expr: str) -> list[dict[str, Any]]:
    """An instant query's result vector."""
    response = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=5)
    body = response.json()
    assert response.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
    return body["data"]["result"]  # type: ignore[no-any-return]


def scalar(url: str, expr: str) -> float | None:
    """The value of a one-series query, None when it has no series yet."""
    result = query(url, expr)
    assert len(result) <= 1, f"{expr} gave {len(result)} series"
    return float(result[0]["value"][1]) if result else None


def wait_for(condition: Any, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {seconds} s waiting for {what}"
        time.sleep(0.25)


@needs_prometheus
def test_recorded_saving_equals_the_saving_of_the_responses(tmp_path: Path, tiny_checkpoint: Path) -> None:
    data = write_tsv(tmp_path / "dev.tsv", ["sentence", "label"], sentiment_rows(60))
    port = free_port()
    # Shadow sampling on: its full-depth re-runs must not leak into the saving counters.
    # The agreement target turns the threshold controller on (every request here pins its threshold, so it
    # changes no answer), for its gauges and rules to have data.
    env = {"DEEBERT_THREADS": "1", "DEEBERT_SHADOW_FRACTION": "0.5", "DEEBERT_TARGET_AGREEMENT": "0.9"}
    server = deebert_server_command(str(tiny_checkpoint), port)
    with (
        running_server(server, env, port, startup_timeout=90) as server_url,
        running_prometheus(prometheus_config(f"127.0.0.1:{port}", tmp_path), tmp_path) as url,
    ):
        # The counters' zero must be in Prometheus before the load, so the 1m window holds all of it.
        wait_for(lambda: scalar(url, 'up{job="deebert"}') == 1.0, 30, "the first scrape")
        wait_for(lambda: scalar(url, "deebert_layers_possible_total") == 0.0, 30, "the counters at zero")
        report = run(
            LoadConfig(
                url=server_url,
                rate=40,
                duration=3.0,
                texts_per_request=2,
                threshold="0:0.3,balanced:0.4,fast:0.3",
                progress=False,
            ),
            Workload.from_file(data),
        )
        num_layers = report["num_layers"]
        possible = num_layers * report["texts_ok"]
        assert report["requests_ok"] == report["requests_sent"] > 50, report["errors"]
        assert report["metrics_layers_possible"] == possible, "the server counted every answered text"

        def recorded_after_last_scrape() -> bool:
            # The last scrape holds the final counters, and a rule evaluation has run since.
            if scalar(url, "deebert_layers_possible_total") != possible:
                return False
            scraped = scalar(url, "timestamp(deebert_layers_possible_total)")
            evaluated = scalar(url, f"timestamp({SAVING_1M})")
            return scraped is not None and evaluated is not None and evaluated > scraped

        wait_for(recorded_after_last_scrape, 30, "a rule evaluation after the final scrape")
        recorded_1m, recorded_5m = scalar(url, SAVING_1M), scalar(url, SAVING_5M)
        results = {expr: query(url, expr) for _, expr in dashboard_queries()}
        rules = {name: query(url, name) for name in recording_rules()}
        agreement = scalar(url, "job:deebert_exit_agreement:ratio_rate5m")
        exit_share = {s["metric"]["le"]: float(s["value"][1]) for s in rules["job_le:deebert_exit_layer:share_rate5m"]}
        queue_depth = scalar(url, "job:deebert_queue_depth:sum")
        p50 = scalar(url, "job:deebert_request_duration_seconds:p50_rate1m")
        p99 = scalar(url, "job:deebert_request_duration_seconds:p99_rate1m")

    from_responses = report["expected_saving"]
    print(
        f"saving from {report['texts_ok']} texts in the responses {from_responses:.6f}; "
        f"recorded by Prometheus 1m {recorded_1m:.6f}, 5m {recorded_5m:.6f}; exit counts {report['exit_counts']}"
    )
    assert 0.05 < from_responses < 0.95, "the mix of thresholds must make the saving a real test"
    assert recorded_1m is not None and abs(recorded_1m - from_responses) <= 0.02
    assert recorded_5m is not None and abs(recorded_5m - from_responses) <= 0.02
    # Every dashboard query and every recording rule has data from the live server.
    assert all(results.values()), [expr for expr, result in results.items() if not result]
    assert all(rules.values()), [name for name, result in rules.items() if not result]
    # Cumulative exit distribution: the share leaving by layer 1 is what the responses show, and 1 at the last.
    assert exit_share[str(float(num_layers))] == pytest.approx(1.0) and exit_share["+Inf"] == pytest.approx(1.0)
    assert exit_share["1.0"] == pytest.approx(report["exit_counts"][0] / report["texts_ok"], abs=0.02)
    assert queue_depth == 0.0
    assert p50 is not None and p99 is not None and 0 < p50 <= p99 < 5
    assert agreement is not None and 0.0 <= agreement <= 1.0, "shadow samples were compared"
