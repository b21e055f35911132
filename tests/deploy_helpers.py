"""The deploy/ files as data: recording rules, dashboard queries, and the metric names the server exports."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from model.saving import saving_from_totals
from server.metrics import Metrics

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
RULES = DEPLOY / "prometheus" / "rules.yml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "deebert.json"

_PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless"}
_LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def recording_rules() -> dict[str, str]:
    """record name → expression, in file order."""
    return {rule["record"]: rule["expr"] for group in load_yaml(RULES)["groups"] for rule in group["rules"]}


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL expression) for every query of every panel."""
    dashboard = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel.get("targets", [])]


def promql_series_names(expr: str) -> set[str]:
    """The metric / recording-rule names an expression reads (not functions, keywords or label names)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors
    text = _LABEL_LIST.sub("", text)  # by (...), on (...), group_left (...)
    names = set()
    for match in re.finditer(r"(?<![\w.])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?", text):
        name, call = match.groups()
        if call or name in _PROMQL_KEYWORDS:
            continue
        names.add(name)
    return names


def server_series_names() -> dict[str, str]:
    """Every series name the server's /metrics can show → its metric type, straight from server/metrics.py."""
    metrics = Metrics(4, "tiny", ["negative", "positive"], saving_from_totals)
    names: dict[str, str] = {}
    suffixes = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_count", "_sum"], "info": ["_info"]}
    for family in metrics.registry.collect():
        for suffix in suffixes[family.type]:
            names[family.name + suffix] = family.type
    return names
