"""deploy/ checked offline: dashboard queries, compose wiring, Kubernetes manifests (schema and structure)."""

from __future__ import annotations

import json
import shutil
import subprocess
from typing import Any

import pytest
import yaml

from server.app import create_app
from server.settings import ServerSettings
from tests.deploy_helpers import (
    DASHBOARD,
    DEPLOY,
    PROMETHEUS_CONFIG,
    REPO,
    dashboard_queries,
    load_yaml,
    promql_series_names,
    recording_rules,
    server_series_names,
)

K8S = DEPLOY / "k8s"
K8S_VERSION = "1.32"  # Debian's kubectl here is 1.32


def test_promql_name_extraction_skips_functions_keywords_labels_and_ranges() -> None:
    expr = 'histogram_quantile(0.99, sum by (job, le) (rate(a_bucket{route=~"x|y"}[1m]))) / ignoring (le) group_left b'
    assert promql_series_names(expr) == {"a_bucket", "b"}
    assert promql_series_names("1 - job:x:ratio_rate5m or vector(0) * 0") == {"job:x:ratio_rate5m"}


def test_recording_rules_read_only_metrics_the_server_exports() -> None:
    exported = server_series_names()
    known = set(exported)
    for name, expr in recording_rules().items():
        unknown = promql_series_names(expr) - known
        assert not unknown, f"rule {name} reads {unknown}, which server/metrics.py does not export"
        known.add(name)  # later rules (in file order) may read earlier ones


def test_every_dashboard_query_reads_a_recording_rule_or_a_server_metric() -> None:
    known = set(recording_rules()) | set(server_series_names())
    queries = dashboard_queries()
    assert len(queries) >= 10
    for title, expr in queries:
        names = promql_series_names(expr)
        assert names, f"panel {title!r}: {expr!r} reads no series"
        assert names <= known, f"panel {title!r} reads {names - known}: neither a recording rule nor a server metric"


def test_dashboard_has_the_panels_operators_need() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels), "panel ids must be unique"
    by_rule = {name: p for p in panels for t in p["targets"] for name in promql_series_names(t["expr"])}
    assert by_rule["job:deebert_expected_saving:ratio_rate1m"]["type"] == "timeseries"  # saving over time
    heatmap = by_rule["job_le:deebert_exit_layer_bucket:rate1m"]
    assert heatmap["type"] == "heatmap" and heatmap["targets"][0]["format"] == "heatmap"  # exit-layer heatmap
    for needed in (
        "job:deebert_request_duration_seconds:p50_rate1m",  # latency percentiles
        "job:deebert_request_duration_seconds:p99_rate1m",
        "job_status:deebert_requests:rate1m",  # throughput
        "job:deebert_queue_depth:sum",  # queue depth
        "job:deebert_requests_overloaded:ratio_rate1m",  # 429 rate
        "job:deebert_degraded:ratio_rate1m",  # brownout
        "job:deebert_exit_agreement:ratio_rate5m",  # shadow sampling
        "job:deebert_controller_threshold:max",  # the threshold controller
        "job:deebert_controller_agreement:min",
    ):
        assert needed in by_rule, f"no panel shows {needed}"
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}" and panel["gridPos"]["w"] > 0


# --- docker compose ----------------------------------------------------------------------------------


def test_compose_runs_the_server_prometheus_and_grafana_from_the_repo_files() -> None:
    compose = load_yaml(DEPLOY / "docker-compose.yml")
    services = compose["services"]
    assert set(services) == {"deebert", "prometheus", "grafana"}
    server = services["deebert"]
    build = DEPLOY / server["build"]["context"]
    assert (build / server["build"]["dockerfile"]).resolve() == REPO / "Dockerfile"
    env = server["environment"]
    assert env["DEEBERT_HOST"] == "0.0.0.0" and env["DEEBERT_THREADS"] == str(server["cpus"])
    _check_deebert_env(env)
    grace = int(server["stop_grace_period"].removesuffix("s"))
    assert grace > float(env["DEEBERT_DRAIN_TIMEOUT_S"]), "docker must wait for the drain before SIGKILL"
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"compose mounts {source}, which is missing"
    # Prometheus finds every replica of the service by name on the server's port, and loads the rules.
    config = load_yaml(PROMETHEUS_CONFIG)
    (job,) = config["scrape_configs"]
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["deebert"] and str(sd["port"]) == env["DEEBERT_PORT"]
    assert (
        config["rule_files"] == ["rules.yml"] and "./prometheus:/etc/prometheus:ro" in services["prometheus"]["volumes"]
    )
    # Grafana: the datasource points at the prometheus service, the dashboard provider at the mounted folder.
    (datasource,) = load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")["datasources"]
    assert datasource["url"] == "http://prometheus:9090" and datasource["type"] == "prometheus"
    (provider,) = load_yaml(DEPLOY / "grafana/provisioning/dashboards/deebert.yml")["providers"]
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in services["grafana"]["volumes"]


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose is not installed")
def test_docker_compose_accepts_the_file() -> None:
    subprocess.run(["docker-compose", "-f", str(DEPLOY / "docker-compose.yml"), "config", "-q"], check=True)


# --- Kubernetes ------------------------------------------------------------------------------------------


def _check_deebert_env(env: dict[str, str]) -> None:
    """Every DEEBERT_* variable names a real setting, and the values are what the settings accept."""
    fields = ServerSettings.model_fields
    values = {}
    for name, value in env.items():
        assert name.startswith("DEEBERT_") and name[8:].lower() in fields, f"{name} is not a deebert setting"
        values[name[8:].lower()] = value
    ServerSettings(**values)


def k8s_documents() -> dict[str, dict[str, Any]]:
    """kind → document, from the files kustomization.yaml lists."""
    kustomization = load_yaml(K8S / "kustomization.yaml")
    documents = [load_yaml(K8S / name) for name in kustomization["resources"]]
    kinds = {doc["kind"]: doc for doc in documents}
    assert len(kinds) == len(documents)
    return kinds


def test_core_manifests_validate_against_the_kubernetes_openapi_schema() -> None:
    # `kubectl apply --dry-run=client` needs an API server even to map kinds (it fails offline with
    # "connection refused", with or without --validate=false), so the schema check runs here, offline.
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    documents = k8s_documents()
    for kind in ("Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"):
        kubernetes_validate.validate(documents[kind], K8S_VERSION, strict=True)
    broken = json.loads(json.dumps(documents["Deployment"]))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] = [8000]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_kustomize_builds_every_manifest_offline() -> None:
    built = subprocess.run(["kubectl", "kustomize", str(K8S)], check=True, capture_output=True, text=True).stdout
    documents = list(yaml.safe_load_all(built))
    assert {d["kind"] for d in documents} == set(k8s_documents())
    assert all(d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "deebert" for d in documents)


def test_deployment_probes_drain_resources_and_threads_fit_the_server() -> None:
    documents = k8s_documents()
    deployment = documents["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    _check_deebert_env(env)
    assert env["DEEBERT_HOST"] == "0.0.0.0"
    routes = {getattr(r, "path", None) for r in create_app(ServerSettings(checkpoint="unused")).routes}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == int(env["DEEBERT_PORT"])
    assert container["readinessProbe"]["httpGet"] == {"path": "/health/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health/live", "port": "http"}
    assert container["startupProbe"]["httpGet"]["path"] == "/health/live"
    assert {"/health/ready", "/health/live", "/metrics"} <= routes
    # SIGKILL only after the preStop pause plus the whole drain.
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] >= int(pre_stop[1]) + float(env["DEEBERT_DRAIN_TIMEOUT_S"]) + 5
    resources = container["resources"]
    cpu_limit = str(resources["limits"]["cpu"])
    cores = int(cpu_limit[:-1]) / 1000 if cpu_limit.endswith("m") else float(cpu_limit)
    assert int(env["DEEBERT_THREADS"]) == cores, "one torch thread per CPU of the limit"
    assert resources["requests"]["cpu"] and resources["requests"]["memory"] and resources["limits"]["memory"]
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_service_monitor_and_autoscaler_point_at_the_right_things() -> None:
    documents = k8s_documents()
    deployment, service = documents["Deployment"], documents["Service"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == "http"
    # ServiceMonitor is a CRD (monitoring.coreos.com): checked structurally.
    monitor = documents["ServiceMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == port["name"] and endpoint["path"] == "/metrics"
    # PrometheusRule (also a CRD) carries exactly deploy/prometheus/rules.yml.
    rule = documents["PrometheusRule"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["spec"] == load_yaml(DEPLOY / "prometheus" / "rules.yml"), "regenerate prometheusrule.yaml"
    # The autoscaler: per-pod metric served by prometheus-adapter from a gauge, never a raw counter.
    hpa = documents["HorizontalPodAutoscaler"]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "deebert"}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
    adapter = load_yaml(K8S / "prometheus-adapter" / "values.yaml")
    (rule_config,) = adapter["rules"]["custom"]
    assert rule_config["name"]["as"] == metric["pods"]["metric"]["name"]
    (source,) = promql_series_names(rule_config["seriesQuery"])
    assert server_series_names()[source] == "gauge", f"{source} must be a per-pod gauge"
    assert "rate(" not in rule_config["metricsQuery"] and "<<.Series>>" in rule_config["metricsQuery"]
    assert rule_config["resources"]["overrides"]["pod"] == {"resource": "pod"}
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]


def test_the_docs_show_how_to_run_the_stack_and_the_manifests() -> None:
    readme = (REPO / "README.md").read_text()
    assert "docs/scaling.md" in readme and "docs/metrics.md" in readme
    assert "docker compose -f deploy/docker-compose.yml up" in (REPO / "docs" / "metrics.md").read_text()
    assert "kubectl apply -k deploy/k8s" in (REPO / "docs" / "scaling.md").read_text()
