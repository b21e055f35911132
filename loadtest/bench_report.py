"""BENCHMARKS.md and its plots from a `deebert bench` run's results (the rendering half of the bench)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadtest.peers import markdown_section
from loadtest.saturation import MAX_ERROR_RATE, P99_BLOWUP, SATURATION_SHARE, sustained
from reports.common import markdown_table, number, percent


def _analysis(results: dict[str, Any]) -> list[str]:
    """Where the time goes, from this run's own numbers: what a missed target is made of."""
    lines: list[str] = []
    batch1 = results.get("batch1")
    rows = {r["threshold"]: r for r in batch1["rows"]} if batch1 else {}
    preset = results.get("balanced_name")
    if "0" in rows and preset in rows:
        full, fast = rows["0"], rows[preset]
        outside = full["mean_latency_ms"] - full["mean_compute_ms"]
        lines.append(
            f"Batch 1: at full depth a request takes {full['mean_latency_ms']:.2f} ms at the client, of which "
            f"{full['mean_compute_ms']:.2f} ms is the model (X-Compute-Time); the other {outside:.2f} ms (HTTP on "
            "loopback, the Python client, tokenizing, queueing) is paid whatever the exit layer, so the latency "
            f"saving at {preset} ({_pct(fast['measured_latency_saving'])}) trails the model-time saving "
            f"({_pct(fast['measured_compute_saving'])}) and the expected saving ({_pct(fast['expected_saving'])})."
        )
    cross = results.get("wrk") or results.get("external")
    if isinstance(cross, dict) and cross.get("ours_over_external"):
        lines.append(
            f"Throughput: the load generator runs on the same two cores as the server; on the same server wrk "
            f"(a C client) sustained {1 / cross['ours_over_external']:.2f}x what the Python generator did, so "
            "every saturated figure here is partly the client's limit, the plain endpoint's included."
        )
    return [*(f"{line}\n" for line in lines)]


def _all_curves(results: dict[str, Any]) -> list[dict[str, Any]]:
    curves = list(results.get("curves", {}).values())
    curves += [results[key] for key in ("no_compaction", "plain") if results.get(key)]
    return curves


def write_plots(results: dict[str, Any], directory: Path) -> dict[str, str]:
    """latency_throughput.png and batch1_saving.png; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = {}
    curves = _all_curves(results)
    if curves:
        figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
        for curve in curves:
            xs = [p["throughput_rps"] for p in curve["points"]]
            for axis, key in zip(axes, ("p50", "p99"), strict=True):
                ys = [p["latency_ms"][key] for p in curve["points"]]
                line = axis.plot(xs, ys, marker="o", label=curve["label"])[0]
                closed = curve["closed_loop"]
                if closed["latency_ms"][key] is not None:
                    axis.plot(closed["throughput_rps"], closed["latency_ms"][key], marker="x", color=line.get_color())
        for axis, key in zip(axes, ("p50", "p99"), strict=True):
            axis.set_yscale("log")
            axis.set_xlabel("achieved throughput (requests/s)")
            axis.set_ylabel(f"{key} latency (ms)")
            axis.set_title(f"{key} latency vs throughput (o open loop, x closed loop)")
            axis.grid(True, alpha=0.3)
        axes[0].legend(fontsize=8)
        figure.tight_layout()
        path = directory / "latency_throughput.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written["latency_throughput"] = str(path)
    batch1 = results.get("batch1")
    rows = [r for r in batch1["rows"] if r["threshold"] != "0"] if batch1 else []
    if rows:
        figure, axis = plt.subplots(figsize=(7, 4))
        positions = list(range(len(rows)))
        width = 0.27
        series = (
            ("expected (exit layers)", "expected_saving"),
            ("measured (client latency)", "measured_latency_saving"),
            ("measured (server compute)", "measured_compute_saving"),
        )
        for offset, (name, key) in zip((-width, 0.0, width), series, strict=True):
            axis.bar([x + offset for x in positions], [100 * (r[key] or 0.0) for r in rows], width, label=name)
        axis.set_xticks(positions, [r["threshold"] for r in rows])
        axis.set_ylabel("saving vs full depth (%)")
        axis.set_title("batch 1: measured vs expected saving")
        axis.legend(fontsize=8)
        axis.grid(True, axis="y", alpha=0.3)
        figure.tight_layout()
        path = directory / "batch1_saving.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written["batch1_saving"] = str(path)
    return written


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    return "\n".join(markdown_table(header, rows))


def _pct(value: float | None) -> str:
    return percent(value)


def _errors(report: dict[str, Any]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in report["errors"].items()) or "0"


def _curve_section(curve: dict[str, Any]) -> str:
    rows = []
    for point in [curve["closed_loop"], *curve["points"]]:
        latency = point["latency_ms"]
        load = f"open {point['rate']:g}/s" if point["mode"] == "open" else f"closed x{point['concurrency']}"
        rows.append(
            [
                load,
                number(point["throughput_rps"], 1),
                number(point["texts_per_s"], 1),
                number(latency["p50"]),
                number(latency["p90"]),
                number(latency["p99"]),
                _errors(point),
                _pct(point["expected_saving"]),
                number(point.get("metrics_mean_batch_size"), 1),
            ]
        )
    header = ["load", "req/s", "texts/s", "p50 ms", "p90 ms", "p99 ms", "errors", "expected saving", "texts per batch"]
    sat = (
        f"Saturated throughput: **{number(sustained(curve), 1)} req/s** (best of: "
        f"{number(curve['saturated_rps_open'], 1)} req/s open loop, "
        f"{number(curve['saturated_rps_closed'], 1)} req/s closed loop)."
    )
    return f"#### {curve['label']}\n\n{_md_table(header, rows)}\n\n{sat}\n"


def _relative(path: str, base: Path) -> str:
    return os.path.relpath(Path(path).resolve(), base.resolve().parent)


def _steal_lines(stolen: dict[str, float | None] | None) -> list[str]:
    """The Machine section's line on CPU time stolen by the hypervisor, per part (none where not recorded)."""
    if not stolen or all(share is None for share in stolen.values()):
        return []
    shares = ", ".join(f"{part} {percent(share, 1)}" for part, share in stolen.items())
    return [
        f"- CPU time stolen by the hypervisor for other guests (steal, /proc/stat): {shares}. A part with a "
        "higher share ran slower than the machine's own speed, so its ratios against other parts are skewed"
    ]


def write_markdown(results: dict[str, Any], path: Path) -> None:
    """BENCHMARKS.md: machine, command, targets, one section per part, plots."""
    m = results["machine"]
    s = results["settings"]
    model = results.get("model", {})
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
    load = m["load_average"]
    out = [
        "# Benchmarks",
        "",
        f"Generated by `deebert bench` on {results['started']} in {results['elapsed_s']:.0f} s. Every number below "
        "comes from this one run: same machine, same data, servers started by the bench on loopback, the load "
        f"generator (`deebert loadtest`, in-process, its {s['http_client']} HTTP client) as the only client. "
        "Regenerate with:",
        "",
        "```bash",
        results["command"],
        "```",
        "",
        "## Machine",
        "",
        f"- {m['platform']} ({m['machine']}), CPU: {m['cpu'] or 'unknown'}, {m['cpu_count']} logical CPUs "
        f"({m['cpus_usable']} usable), {m['memory_gib']} GiB memory",
        f"- SIMD: {' '.join(m.get('cpu_flags') or []) or 'not reported'} (the instruction sets that decide which "
        "kernels, runtime and precision are fastest here)",
        f"- Python {m['python']}; {versions}",
        f"- model: {model.get('model', '-')} ({model.get('num_layers', '-')} layers) on {model.get('device', '-')}, "
        f"{model.get('dtype', '-')}; data: `{s['data']}`",
        f"- server: {', '.join(f'{k}={v}' for k, v in results['server_env'].items())}",
        f"- load average at start {', '.join(f'{x:.2f}' for x in load) if load else '-'}; client and servers share "
        "these CPUs, so the generator's own cost is part of every number",
        *_steal_lines(results.get("cpu_stolen")),
        "",
        "## Targets",
        "",
        _md_table(["target", "result", "numbers"], [[t["name"], t["status"], t["detail"]] for t in results["targets"]]),
        "",
        *_analysis(results),
    ]
    batch1 = results.get("batch1")
    if batch1:
        rows = [
            [
                r["threshold"],
                str(r["requests"]),
                number(r["mean_latency_ms"]),
                number(r["p50_latency_ms"]),
                number(r["mean_compute_ms"]),
                number(r["overhead_p50_ms"], 3),
                " / ".join(
                    number(r.get(key), 3, missing="n/a")  # n/a: a run recorded before the server sent these
                    for key in ("tokenization_p50_ms", "queue_p50_ms", "overhead_rest_p50_ms")
                ),
                _pct(r["expected_saving"]),
                _pct(r["metrics_expected_saving"]),
                _pct(r["measured_latency_saving"]),
                _pct(r["measured_compute_saving"]),
            ]
            for r in batch1["rows"]
        ]
        header = ["threshold", "requests", "mean ms", "p50 ms", "compute ms", "overhead p50 ms",
                  "of which tokenizing / queue / rest p50 ms", "expected saving", "/metrics saving",
                  "measured (latency)", "measured (compute)"]  # fmt: skip
        out += [
            "## 1. Batch-1 latency",
            "",
            f"Closed loop, one client, one text per request, {s['batch1_duration']:g} s per threshold. Measured saving "
            "= 1 - mean latency / mean latency at threshold 0 (client-side; the compute column uses X-Compute-Time). "
            "Expected saving = 1 - Σ i·N_i / (n·Σ N_i) from the responses' exit layers; the /metrics column is the "
            "same from the server's counters. Overhead = X-Total-Time - X-Compute-Time, per request; of which "
            "X-Tokenization-Time, X-Queue-Time (from queueing to the batch's start on the model's thread) and the rest "
            "(the answer's way back to the event loop, metrics, the JSON), each a p50 of its own.",
            "",
            _md_table(header, rows),
            "",
        ]
    curves = results.get("curves", {})
    if curves:
        out += [
            "## 2. Latency vs throughput",
            "",
            f"Dynamic batching (max batch {s['max_batch_size']}, max wait {s['max_wait_ms']:g} ms). One closed-loop "
            f"point at {s['saturation_concurrency']} clients, then open-loop Poisson arrivals at rising rates "
            f"({s['duration_per_point']:g} s each) until saturation (achieved < {SATURATION_SHARE:.0%} of offered, "
            f"errors > {MAX_ERROR_RATE:.0%}, or p99 > {P99_BLOWUP:g}x the first point's). Saturated throughput = "
            "the most requests/s a point sustained with few errors. Open-loop latency counts from the scheduled "
            "arrival.",
            "",
        ]
        out += [_curve_section(c) for c in curves.values()]
    if results.get("plain"):
        out += [
            "## 3. Baseline: a plain transformers endpoint",
            "",
            "`loadtest/baselines/plain_server.py`: the same weights as a plain full forward (encoder + final "
            "classifier), one request at a time, no batching, no early exit.",
            "",
            _curve_section(results["plain"]),
        ]
    if results.get("plain_best"):
        point = results.get("plain_best_batch1") or {}
        latency = point.get("latency_ms", {})
        runtime = results.get("plain_best_runtime") or {}
        out += [
            "## 3b. Baseline: the plain endpoint on the best plain runtime",
            "",
            f"`loadtest/baselines/plain_server.py --backend {runtime.get('backend')} --precision "
            f"{runtime.get('precision')}`: the same weights as a plain full forward on {runtime.get('label')}, "
            "the plain variant the peers run (section 6) found fastest at batch 1 on this machine (a plain endpoint "
            "runs one request at a time, so its speed is its runtime's batch-1 speed); no batching, no early exit.",
            "",
            f"Batch 1 (one client, {s['batch1_duration']:g} s): p50 {number(latency.get('p50'))} ms, mean "
            f"{number(latency.get('mean'))} ms, p99 {number(latency.get('p99'))} ms.",
            "",
            _curve_section(results["plain_best"]),
        ]
    if "compaction_supported" in results:
        note = (
            "The server reads `DEEBERT_COMPACTION`."
            if results["compaction_supported"]
            else "**This checkout's server has no `compaction` setting yet: DEEBERT_COMPACTION was ignored, so this "
            "curve measures compaction on.**"
        )
        out += [
            "## 4. Compaction vs none",
            "",
            f"The balanced curve again on a server started with `DEEBERT_COMPACTION=false` (exited rows stay in the "
            f"batch, masked, until every row has left). {note}",
            "",
        ]
        if results.get("no_compaction"):
            with_c, without = sustained(curves.get("balanced")), sustained(results["no_compaction"])
            ratio = f"{with_c / without:.2f}x" if with_c and without else "-"
            out += [_curve_section(results["no_compaction"]), f"Compaction on / off, saturated: {ratio}.", ""]
    wrk = results.get("wrk")
    if wrk is not None:
        out += ["## 5. Cross-check with an external tool", ""]
        if wrk.get("tool") is None or "external" not in wrk:
            out += [wrk.get("note", "not run"), ""]
        else:
            ext, ours = wrk["external"], wrk["ours"]
            rows = [
                [wrk["tool"], number(ext["throughput_rps"], 1), number(ext["latency_ms"].get("p50")),
                 number(ext["latency_ms"].get("p99")), str(ext.get("non_2xx", "-"))],
                ["deebert loadtest", number(ours["throughput_rps"], 1), number(ours["latency_ms"]["p50"]),
                 number(ours["latency_ms"]["p99"]), str(sum(ours["errors"].values()))],
            ]  # fmt: skip
            out += [
                f"Closed loop, {wrk['concurrency']} connections, threshold {wrk['threshold']}, {wrk['duration_s']} s "
                f"each, back to back on the same server. `{wrk['command']}`",
                "",
                _md_table(["tool", "req/s", "p50 ms", "p99 ms", "errors"], rows),
                "",
                f"Ours / {wrk['tool']}: {number(wrk['ours_over_external'])}.",
                "",
            ]
    if results.get("peers"):
        out += markdown_section(results["peers"], "## 6. Peer runtimes, in process")
    files = results.get("files", {})
    plots = [(name, p) for name, p in files.items() if p.endswith(".png")]
    if plots:
        out += ["## Plots", ""]
        out += [f"![{name}]({_relative(p, path)})" for name, p in plots]
        out += [""]
    out += [f"Raw numbers: `{_relative(files['json'], path)}`." if "json" in files else "", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(out))
