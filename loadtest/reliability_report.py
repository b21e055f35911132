"""A reliability run in words: the terminal summary and RELIABILITY.md."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loadtest.reliability_checks import (
    DEFAULT_DURATION,
    MODES,
    Mode,
    growth_text,
    mib_text,
    ms_text,
    relative_growth,
    rss_text,
    soak_rss_growth,
)
from reports.common import describe_machine, markdown_table, number
from reports.terminal import key_values, table


def format_summary(report: dict[str, Any]) -> str:
    """A few lines for the terminal: the counts, latency, RSS, and each check."""
    o, load, rss = report["outcome"], report["load"], report["rss"]
    lat, server = o["latency_accepted_ms"], o["server_latency_accepted_ms"]
    headline = (
        f"{report['mode']}: {load['offered_rps']:.1f} req/s offered ({load['share_of_capacity']:g} x capacity "
        f"{report['capacity']['throughput_rps']:.1f} req/s) for {load['duration_s']:g} s"
    )
    facts = key_values(
        [
            (
                "requests",
                f"sent {o['sent']}  accepted {o['accepted']}  refused {o['refused']}  failed {o['failed']}  "
                f"lost {o['lost']}  client-dropped {o['client_dropped']}",
            ),
            (
                "accepted latency",
                f"p50 {ms_text(lat['p50'])}  p99 {ms_text(lat['p99'])} (client, from scheduled arrival); "
                f"server-side p50 {ms_text(server['p50'])}  p99 {ms_text(server['p99'])}",
            ),
            ("queue bound", f"{ms_text(report['latency_bound']['bound_ms'])} = {report['latency_bound']['formula']}"),
            (
                "RSS",
                f"before {rss_text(rss['before'])}  peak {rss_text(rss['peak'])}  end {rss_text(rss['end'])}  "
                f"after idle {rss_text(rss['after'])}",
            ),
        ],
        indent="  ",
    )
    checks = table(
        (), [["PASS" if c["passed"] else "FAIL", f"{c['name']}: {c['detail']}"] for c in report["checks"]], indent="  "
    )
    return "\n".join([headline, facts, checks])


def _checks_lines(report: dict[str, Any]) -> list[str]:
    return [f"- {'✅' if c['passed'] else '❌'} **{c['name']}**: {c['detail']}" for c in report["checks"]]


def _short_note(report: dict[str, Any]) -> list[str]:
    mode: Mode = report["mode"]
    if report["load"]["duration_s"] >= DEFAULT_DURATION[mode]:
        return []
    return [
        f"> **Short run** ({report['load']['duration_s']:g} s instead of {DEFAULT_DURATION[mode]:g} s): a check of "
        "the runner, not the figures the issue asks for.",
        "",
    ]


def _common_lines(report: dict[str, Any]) -> list[str]:
    o, load, bound, service = report["outcome"], report["load"], report["latency_bound"], report["service_time"]
    cap = report["capacity"]
    return [
        f"Command: `{report['command']}` (started {report['started']}, finished {report['finished']}).",
        "",
        f"Machine: {describe_machine(report['machine'])}. The load generator runs on the same machine as the server.",
        "",
        f"Server: `{report['model'].get('model')}` ({report['model'].get('num_layers')} layers"
        + "".join(f", {k} {v}" for k, v in report.get("runtime", {}).items())
        + "), "
        + ", ".join(f"`{k}={v}`" for k, v in report["server_env"].items())
        + f"; requests of one text, threshold `{report['settings']['threshold'] or 'server default'}`.",
        "",
        f"Capacity: {cap['throughput_rps']:.1f} req/s (closed loop, {cap['concurrency']} clients, "
        f"{cap['duration_s']:g} s). Offered: {load['offered_rps']:.1f} req/s open-loop Poisson "
        f"({load['share_of_capacity']:g} x capacity) for {load['duration_s']:g} s; generator lag at most "
        f"{1000 * load['max_schedule_lag_s']:.0f} ms.",
        "",
        f"Latency bound = {bound['formula']} = {bound['bound_ms'] / bound['full_batch_ms']:g} x "
        f"{bound['full_batch_ms']:.1f} ms = **{bound['bound_ms']:.0f} ms**. The full-batch time is the p50 of "
        f"{service['samples']} requests of {service['batch_size']} texts at threshold 0 on the idle server "
        f"(p90 {service['p90_ms']:.1f} ms). Accepted over the whole run, drain included: "
        f"{load['accepted_rps']:.1f} req/s.",
        "",
        *markdown_table(
            ["sent", "accepted (2xx)", "refused (429)", "failed (5xx, other)", "lost", "dropped by the client"],
            [
                [
                    str(o["sent"]),
                    str(o["accepted"]),
                    f"{o['refused']} ({o['refused_without_retry_after']} without Retry-After)",
                    f"{o['failed']} {o['failed_by_status'] or ''}".strip(),
                    f"{o['lost']} {o['lost_by_kind'] or ''}".strip(),
                    str(o["client_dropped"]),
                ]
            ],
        ),
        "",
    ]


def _after_lines(report: dict[str, Any]) -> list[str]:
    before, after = report["before"], report["after"]
    rows = [
        [
            name,
            str(s["ready_status"]),
            f"{s['probe']['ok']}/{s['probe']['requests']}",
            ms_text(s["probe"]["p50_ms"]),
            ms_text(s["probe"]["p99_ms"]),
            f"{_num(s['queue_depth'])} / {_num(s['inflight_requests'])}",
        ]
        for name, s in (("before", before), ("after", after))
    ]
    return [
        *markdown_table(["", "/health/ready", "probe 200s", "probe p50", "probe p99", "queue depth / in flight"], rows),
        "",
    ]


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def overload_section(report: dict[str, Any]) -> list[str]:
    """RELIABILITY.md's overload section, from the run's JSON."""
    lat, rss = report["outcome"]["latency_accepted_ms"], report["rss"]
    server = report["outcome"]["server_latency_accepted_ms"]
    return [
        f"## Overload: {report['load']['share_of_capacity']:g} x capacity for {report['load']['duration_s']:g} s",
        "",
        *_short_note(report),
        *_common_lines(report),
        f"Accepted requests, server-side (X-Total-Time: from the route taking the request to its answer, the "
        f"span the queue bounds): p50 {ms_text(server['p50'])}, **p99 {ms_text(server['p99'])}**, "
        f"max {ms_text(server['max'])}. "
        f"As the client saw them, from the scheduled arrival (so the generator's own lag, up to "
        f"{1000 * report['load']['max_schedule_lag_s']:.0f} ms here, and the server's accept backlog count): "
        f"p50 {ms_text(lat['p50'])}, p90 {ms_text(lat['p90'])}, p99 {ms_text(lat['p99'])}, max {ms_text(lat['max'])}.",
        "",
        f"Server RSS: before {rss_text(rss['before'])}, peak {rss_text(rss['peak'])}, after "
        f"{report['settings']['idle']:g} s idle {rss_text(rss['after'])} "
        f"({growth_text(relative_growth(rss['before'], rss['after']))}).",
        "",
        "Before and after (one request at a time, one text each):",
        "",
        *_after_lines(report),
        *_checks_lines(report),
        "",
    ]


def soak_section(report: dict[str, Any]) -> list[str]:
    """RELIABILITY.md's soak section, from the run's JSON."""
    lat, rss = report["outcome"]["latency_accepted_ms"], report["rss"]
    window_rows = [
        [
            f"{w['start_s']:g}–{w['end_s']:g}",
            str(w["sent"]),
            str(w["errors"]),
            ms_text(w["p50_ms"]),
            ms_text(w["p99_ms"]),
            ms_text(w["server_p99_ms"]),
            number(w.get("rss_median_mib"), 1),
            number(w["rss_peak_mib"], 1),
        ]
        for w in report["windows"]
    ]
    first, last, growth = soak_rss_growth(report["windows"])
    return [
        f"## Soak: {report['load']['share_of_capacity']:g} x capacity for {report['load']['duration_s']:g} s",
        "",
        *_short_note(report),
        *_common_lines(report),
        f"Accepted requests overall, as the client saw them: p50 {ms_text(lat['p50'])}, **p99 {ms_text(lat['p99'])}**, "
        f"max {ms_text(lat['max'])}; "
        f"server-side p99 {ms_text(report['outcome']['server_latency_accepted_ms']['p99'])}. "
        f"Server RSS: median {mib_text(first)} over the first window, {mib_text(last)} over the last "
        f"(**{growth_text(growth)}**); "
        f"idle before the load {rss_text(rss['before'])}, end of load {rss_text(rss['end'])} "
        f"({growth_text(relative_growth(rss['before'], rss['end']))}: the load's working set and any growth), "
        f"peak {rss_text(rss['peak'])}, after {report['settings']['idle']:g} s idle {rss_text(rss['after'])}.",
        "",
        f"Per {report['settings']['window']:g}-second window (by send time):",
        "",
        *markdown_table(
            ["window (s)", "sent", "errors", "p50", "p99", "server p99", "median RSS (MiB)", "peak RSS (MiB)"],
            window_rows,
        ),
        "",
        "Before and after:",
        "",
        *_after_lines(report),
        *_checks_lines(report),
        "",
    ]


def write_markdown(results_dir: Path, path: Path) -> None:
    """RELIABILITY.md from every `reliability_<mode>.json` in `results_dir` (a mode not run yet says so)."""
    lines = [
        "# Reliability",
        "",
        "Generated by `deebert reliability` from `"
        + str(results_dir)
        + "/reliability_*.json`; do not edit by hand. Each section names its command and machine.",
        "See `loadtest/reliability.py` for what is measured and why each check is what it is.",
        "",
    ]
    for mode in MODES:
        json_path = results_dir / f"reliability_{mode}.json"
        if not json_path.exists():
            lines += [f"## {mode.capitalize()}", "", f"Not run yet: `deebert reliability {mode}`.", ""]
            continue
        report = json.loads(json_path.read_text())
        try:
            lines += overload_section(report) if mode == "overload" else soak_section(report)
        except (KeyError, TypeError) as err:  # a JSON from an older runner
            lines += [
                f"## {mode.capitalize()}",
                "",
                f"`{json_path}` lacks {err}; rerun `deebert reliability {mode}`.",
                "",
            ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines).rstrip() + "\n")
