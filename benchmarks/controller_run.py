"""The threshold controller on live traffic: a drift run and a load step, each against a fixed threshold.

    python -m benchmarks.controller_run drift       # SST-2 dev text, then MRPC/RTE text, then SST-2 again
    python -m benchmarks.controller_run load-step   # SST-2 text at a low rate, a step up, and back down

Each experiment starts `deebert serve` on the shipped checkpoint twice and sends both the same open-loop
traffic (Poisson arrivals, one text per request, no threshold pinned, same seed), phase by phase: once with
the target set (the controller moves the default threshold) and once at a fixed default. `/metrics` is
scraped every second (the controller's threshold, its agreement estimate, its moves). After the load, every
text sent is classified again at full depth (`X-Exit-Threshold: 0`), so each answer served is scored against
the full model's label: the agreement users actually got, measured outside the controller.

- drift: the target is an agreement (`--target-agreement`); the fixed variant serves at the threshold the
  controller held when the SST-2 phase ended (what calibrating on SST-2 would have chosen). Before the
  servers start, the agreement and expected saving of every rung on each corpus are computed offline (same
  ladder), so the run can be read against what each threshold gives on each kind of text.
- load-step: the target is a p99 (`--target-p99-ms`); the fixed variant serves at the configured default
  (`--default`, for both variants; the server's own, `balanced`, when not given). `--server-cpus`,
  `--client-cpus` and `--server-threads` keep the load generator off the server's cores.

Writes benchmarks/results/controller/{drift,load_step}.json and .png, and prints a markdown summary with the
command and the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import itertools
import json
import os
import random
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from loadtest.generator import poisson_schedule
from loadtest.rawhttp import RawClient
from loadtest.records import parse_metrics
from loadtest.servers import REPO_ROOT, deebert_server_command, free_port, server_process
from model.saving import expected_saving
from reports.common import describe_machine, machine_description, markdown_table, number, percent
from server.protocol import CLASSIFY_PATH, METRICS_PATH, THRESHOLD_HEADER

DATA = REPO_ROOT.parent / "shared" / "data"
RESULTS = REPO_ROOT / "loadtest" / "results" / "controller"
CHECKPOINT = "weights/sst2-minilm-l6"


@dataclass(frozen=True)
class Phase:
    name: str
    corpus: str  # "sst2" or "other" (MRPC and RTE sentences)
    rate: float  # requests per second
    duration_s: float


@dataclass
class Sent:
    """One request: when it was due (s from the start), its phase, text, and what came back."""

    at: float
    phase: str
    text: str
    status: int
    latency_s: float
    label_id: int | None = None
    exit_layer: int | None = None
    threshold: float | None = None
    server_ms: float | None = None  # the server's own request time (X-Total-Time), what the p99 target judges


def corpora(data: Path) -> dict[str, list[str]]:
    """SST-2 dev sentences, and the MRPC + RTE dev sentences (each side of a pair is one text)."""
    from model.data import read_dataset

    sst2 = read_dataset(data / "sst2" / "dev.tsv").texts
    other: list[str] = []
    for task in ("mrpc", "rte"):
        dataset = read_dataset(data / task / "dev.tsv")
        other += dataset.texts + (dataset.text_pairs or [])
    random.Random(0).shuffle(other)
    return {"sst2": sst2, "other": other}


async def drive(
    url: str, phases: Sequence[Phase], texts: dict[str, list[str]], seed: int
) -> tuple[list[Sent], list[dict[str, Any]]]:
    """Send the phases' open-loop traffic while scraping /metrics every second; the requests and scrapes."""
    rng = random.Random(seed)
    plan: list[tuple[float, str, str]] = []
    offset = 0.0
    for phase in phases:
        for at in poisson_schedule(phase.rate, random.Random(rng.random()), None, phase.duration_s):
            plan.append((offset + at, phase.name, rng.choice(texts[phase.corpus])))
        offset += phase.duration_s
    client = RawClient(url, timeout=60.0, max_connections=512)
    sent: list[Sent] = []
    scrapes: list[dict[str, Any]] = []
    start = time.perf_counter()
    done = asyncio.Event()

    async def one(at: float, phase: str, text: str) -> None:
        due = start + at
        try:
            response = await client.post(CLASSIFY_PATH, json={"texts": [text]})
        except httpx.HTTPError:
            sent.append(Sent(at, phase, text, 0, time.perf_counter() - due))
            return
        record = Sent(at, phase, text, response.status_code, time.perf_counter() - due)
        if response.status_code == 200:
            body = response.json()
            record.label_id = int(body["results"][0]["label_id"])
            record.exit_layer = int(body["results"][0]["exit_layer"])
            record.threshold = float(body["threshold"])
            total = response.headers.get("x-total-time")
            record.server_ms = float(total) if total is not None else None
        sent.append(record)

    async def scrape() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            while not done.is_set():
                with_time = time.perf_counter() - start
                try:
                    page = (await http.get(METRICS_PATH)).text
                except httpx.HTTPError:
                    page = ""
                scrapes.append({"t": with_time, **controller_metrics(page)})
                await asyncio.sleep(1.0)

    scraper = asyncio.create_task(scrape())
    tasks = []
    for at, phase_name, text in plan:
        delay = start + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(at, phase_name, text)))
    await asyncio.gather(*tasks)
    done.set()
    await scraper
    await client.aclose()
    return sorted(sent, key=lambda s: s.at), scrapes


def controller_metrics(page: str) -> dict[str, Any]:
    """What the figure and summary need from one /metrics page."""
    found: dict[str, Any] = {"agreement": {}, "adjustments": {}}
    for sample in parse_metrics(page):
        if sample.name == "deebert_controller_threshold":
            found["threshold"] = sample.value
        elif sample.name == "deebert_controller_agreement":
            found["agreement"][f"{sample.labels['window']}/{sample.labels['bound']}"] = sample.value
        elif sample.name == "deebert_controller_adjustments_total":
            found["adjustments"][sample.labels["reason"]] = sample.value
        elif sample.name == "deebert_controller_p99_seconds":
            found["p99_s"] = None if np.isnan(sample.value) else sample.value
        elif sample.name in ("deebert_layers_executed_total", "deebert_layers_possible_total"):
            found[sample.name] = sample.value
    return found


def full_depth_labels(url: str, texts: set[str]) -> dict[str, int]:
    """Every text's label at full depth, asked of the server itself (threshold 0)."""
    ordered = sorted(texts)
    labels: dict[str, int] = {}
    with httpx.Client(base_url=url, timeout=120) as http:
        for start in range(0, len(ordered), 32):
            chunk = ordered[start : start + 32]
            response = http.post(CLASSIFY_PATH, json={"texts": chunk}, headers={THRESHOLD_HEADER: "0"})
            response.raise_for_status()
            labels.update(zip(chunk, (int(r["label_id"]) for r in response.json()["results"]), strict=True))
    return labels


def ladder_table(texts: dict[str, list[str]], ceiling: str) -> dict[str, Any]:
    """Offline, per rung of the controller's ladder: agreement with full depth and expected saving per corpus."""
    from server.engine import Engine
    from server.settings import ServerSettings

    engine = Engine.load(ServerSettings(checkpoint=CHECKPOINT))
    ladder = [rung.value for rung in engine.threshold_ladder(engine.resolve_threshold(ceiling))]
    table: dict[str, Any] = {"ladder": ladder, "backend": engine.backend}
    for name, corpus in texts.items():
        evidence = []
        for start in range(0, len(corpus), 64):
            evidence += engine.ladder_exits(engine.tokenize(corpus[start : start + 64], None, True), ladder)
        agrees = np.array([proof.agrees for proof in evidence], dtype=float)
        layers = np.array([proof.exit_layers for proof in evidence], dtype=float)
        table[name] = {
            "texts": len(corpus),
            "agreement": agrees.mean(axis=0).tolist(),
            "expected_saving": [expected_saving(column, engine.num_layers) for column in layers.T.astype(int).tolist()],
        }
    return table


@dataclass(frozen=True)
class Placement:
    """Where the server and the load generator run: CPU sets (None: anywhere) and the server's threads."""

    server_cpus: str | None = None
    client_cpus: str | None = None
    server_threads: int | None = None

    def server_argv(self, argv: list[str]) -> list[str]:
        if self.server_cpus is None:
            return argv
        if shutil.which("taskset") is None:
            raise SystemExit("--server-cpus needs taskset (util-linux)")
        return ["taskset", "-c", self.server_cpus, *argv]

    def server_env(self) -> dict[str, str]:
        return {} if self.server_threads is None else {"DEEBERT_THREADS": str(self.server_threads)}

    def pin_client(self) -> None:
        if self.client_cpus is not None:
            os.sched_setaffinity(0, cpu_set(self.client_cpus))

    def describe(self) -> str:
        server = f"server on CPU {self.server_cpus}" if self.server_cpus else "server on any CPU"
        client = f"load generator on CPU {self.client_cpus}" if self.client_cpus else "load generator on any CPU"
        threads = f", {self.server_threads} server thread(s)" if self.server_threads else ""
        return f"{server}, {client}{threads}"


def cpu_set(spec: str) -> set[int]:
    """CPUs from a taskset-style list: `1`, `0,2`, `2-3`."""
    cpus: set[int] = set()
    for part in spec.split(","):
        low, _, high = part.strip().partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    return cpus


def run_variant(
    name: str,
    env: dict[str, str],
    phases: Sequence[Phase],
    texts: dict[str, list[str]],
    seed: int,
    log_dir: Path,
    placement: Placement = Placement(),
) -> dict[str, Any]:
    """One server, the whole traffic, then the full-depth labels; everything the summary and figure need."""
    port = free_port()
    log_path = log_dir / f"{name}.log"
    env = {"DEEBERT_CHECKPOINT": CHECKPOINT, **placement.server_env(), **env}
    print(f"[{name}] serving with {env} ({placement.describe()})", file=sys.stderr)
    argv = placement.server_argv(deebert_server_command(CHECKPOINT, port))
    with server_process(argv, env, port, 180, log_path) as (_, url):
        sent, scrapes = asyncio.run(drive(url, phases, texts, seed))
        info = httpx.get(f"{url}/v1/model", timeout=10).json()
        full = full_depth_labels(url, {s.text for s in sent if s.status == 200})
    log_lines = [line for line in log_path.read_text().splitlines() if "default threshold" in line]
    return {
        "name": name,
        "env": env,
        "sent": [asdict(s) | {"full_label_id": full.get(s.text)} for s in sent],
        "scrapes": scrapes,
        "controller": info.get("controller"),
        "default_threshold": info["default_threshold"],
        "num_layers": info["num_layers"],
        "controller_log": log_lines,
    }


def agreement_of(answered: list[dict[str, Any]]) -> float | None:
    """Share of answered requests whose label is the full model's label for the same text; None for none."""
    return float(np.mean([s["label_id"] == s["full_label_id"] for s in answered])) if answered else None


def phase_summary(
    run: dict[str, Any], phases: Sequence[Phase], start_s: float = 0.0, only: str | None = None
) -> list[dict[str, Any]]:
    """Per phase (from `start_s` into it; `only`: just that one): answered share, agreement with full depth,
    expected saving, latency."""
    rows = []
    offset = 0.0
    for phase in phases:
        if only is not None and phase.name != only:
            offset += phase.duration_s
            continue
        sent = [s for s in run["sent"] if s["phase"] == phase.name and s["at"] >= offset + start_s]
        ok = [s for s in sent if s["status"] == 200]
        latencies = [s["latency_s"] for s in sent if s["status"] == 200]
        server = [s["server_ms"] for s in sent if s["status"] == 200 and s.get("server_ms") is not None]
        rows.append(
            {
                "phase": phase.name,
                "requests": len(sent),
                "answered": len(ok) / len(sent) if sent else None,
                "refused": sum(1 for s in sent if s["status"] == 429),
                "agreement": agreement_of(ok),
                "saving": expected_saving([s["exit_layer"] for s in ok], run["num_layers"]),
                "mean_threshold": float(np.mean([s["threshold"] for s in ok])) if ok else None,
                "p50_ms": float(np.percentile(latencies, 50)) * 1000 if latencies else None,
                "p99_ms": float(np.percentile(latencies, 99)) * 1000 if latencies else None,
                "server_p99_ms": float(np.percentile(server, 99)) if server else None,
            }
        )
        offset += phase.duration_s
    return rows


def bins(run: dict[str, Any], width_s: float, total_s: float) -> dict[str, list[float | None]]:
    """Per time bin: agreement with full depth, expected saving, p99 latency (ms), answered requests/s."""
    edges = np.arange(0.0, total_s + width_s, width_s)
    out: dict[str, list[float | None]] = {"t": [], "agreement": [], "saving": [], "p99_ms": [], "answered_per_s": []}
    for low, high in itertools.pairwise(edges):
        inside = [s for s in run["sent"] if low <= s["at"] < high]
        ok = [s for s in inside if s["status"] == 200]
        out["t"].append(float(low + width_s / 2))
        out["agreement"].append(agreement_of(ok))
        out["saving"].append(expected_saving([s["exit_layer"] for s in ok], run["num_layers"]))
        out["p99_ms"].append(float(np.percentile([s["latency_s"] for s in inside], 99)) * 1000 if inside else None)
        out["answered_per_s"].append(len(ok) / width_s)
    return out


def first_move_after(scrapes: list[dict[str, Any]], at: float, direction: int) -> float | None:
    """Seconds after `at` until the scraped default threshold first moved in `direction` (+1 up, -1 down)."""
    before = [s.get("threshold") for s in scrapes if s["t"] <= at and s.get("threshold") is not None]
    if not before:
        return None
    reference = before[-1]
    for scrape in scrapes:
        value = scrape.get("threshold")
        if scrape["t"] > at and value is not None and (value - reference) * direction > 1e-9:
            return float(scrape["t"] - at)
    return None


def plot(experiment: str, result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = [Phase(**p) for p in result["phases"]]
    runs = result["runs"]
    fig, axes = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    colors = {"controller": "tab:blue", "fixed": "tab:orange"}
    for run in runs:
        scrapes = [s for s in run["scrapes"] if s.get("threshold") is not None]
        axes[0].step(
            [s["t"] for s in scrapes],
            [s["threshold"] for s in scrapes],
            where="post",
            color=colors[run["name"]],
            label=f"{run['name']}",
        )
        binned = run["bins"]
        if experiment == "drift":
            axes[1].plot(
                binned["t"],
                binned["agreement"],
                marker=".",
                color=colors[run["name"]],
                label=f"{run['name']}: served answers",
            )
            axes[2].plot(binned["t"], binned["saving"], marker=".", color=colors[run["name"]], label=run["name"])
        else:
            axes[1].plot(binned["t"], binned["p99_ms"], marker=".", color=colors[run["name"]], label=run["name"])
            axes[2].plot(
                binned["t"], binned["answered_per_s"], marker=".", color=colors[run["name"]], label=run["name"]
            )
    if experiment == "drift":
        controller = next(r for r in runs if r["name"] == "controller")
        estimate = [(s["t"], s["agreement"].get("400/estimate")) for s in controller["scrapes"]]
        estimate = [(t, v) for t, v in estimate if v is not None]
        if estimate:
            axes[1].plot(
                *zip(*estimate, strict=True),
                color="tab:blue",
                alpha=0.35,
                label="controller's estimate at its threshold (newest 400 samples)",
            )
        axes[1].axhline(result["target"], color="gray", linestyle="--", label=f"target {result['target']}")
        axes[1].set_ylabel("agreement with full depth\n(10 s bins)")
        axes[2].set_ylabel("expected saving")
    else:
        axes[1].axhline(result["target"], color="gray", linestyle="--", label=f"target p99 {result['target']:g} ms")
        axes[1].set_yscale("log")
        axes[1].set_ylabel("client p99 latency, ms\n(5 s bins)")
        offered = []
        for phase in phases:
            offered += [phase.rate, phase.rate]
        edges = np.cumsum([0.0] + [p.duration_s for p in phases])
        axes[2].plot(np.repeat(edges, 2)[1:-1], offered, color="gray", linestyle="--", label="offered")
        axes[2].set_ylabel("answered requests/s")
    axes[0].set_ylabel("default threshold\n(entropy, nats)")
    offset = 0.0
    for phase in phases:
        for axis in axes:
            axis.axvline(offset, color="black", alpha=0.2)
        axes[0].text(offset + 1, axes[0].get_ylim()[1], phase.name, va="top", fontsize=8)
        offset += phase.duration_s
    for axis in axes:
        axis.legend(fontsize=7, loc="best")
        axis.grid(alpha=0.3)
    axes[-1].set_xlabel("seconds")
    fig.suptitle(result["title"], fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def held_windows(result: dict[str, Any]) -> str:
    """In the step phase: how many of the 5 s windows kept the client p99 within the target, per variant."""
    phases = [Phase(**p) for p in result["phases"]]
    start, end = phases[0].duration_s, phases[0].duration_s + phases[1].duration_s
    parts = []
    for run in result["runs"]:
        inside = [v for t, v in zip(run["bins"]["t"], run["bins"]["p99_ms"], strict=True) if start < t < end]
        held = sum(1 for v in inside if v is not None and v <= result["target"])
        parts.append(f"{run['name']} {held} of {len(inside)}")
    return f"5 s windows of the step whose client p99 was within {result['target']:g} ms: " + ", ".join(parts)


def summarize(experiment: str, result: dict[str, Any]) -> str:
    """The markdown summary: what ran, on what, and the per-phase numbers of both variants."""
    lines = [f"### {result['title']}", "", f"`{result['command']}`", "", describe_machine(result["machine"]), ""]
    header = [
        "variant",
        "phase",
        "requests",
        "answered",
        "agreement w/ full depth",
        "expected saving",
        "client p50 ms",
        "client p99 ms",
        "server p99 ms",
    ]
    rows = []
    for run in result["runs"]:
        for row in run["phases"]:
            rows.append(
                [
                    run["name"],
                    row["phase"],
                    str(row["requests"]),
                    percent(row["answered"]),
                    percent(row["agreement"]),
                    percent(row["saving"]),
                    number(row["p50_ms"], 1),
                    number(row["p99_ms"], 1),
                    number(row["server_p99_ms"], 1),
                ]
            )
    lines += markdown_table(header, rows)
    lines += ["", *(f"- {fact}" for fact in result["facts"])]
    if experiment == "load-step":
        lines.append(f"- {held_windows(result)}")
    return "\n".join(lines) + "\n"


def run_experiment(experiment: str, args: argparse.Namespace) -> dict[str, Any]:
    texts = corpora(args.data)
    log_dir = args.output / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    facts: list[str] = []
    placement = Placement(args.server_cpus, args.client_cpus, args.server_threads)
    placement.pin_client()
    facts.append(f"placement: {placement.describe()}")
    result: dict[str, Any] = {"experiment": experiment, "machine": machine_description(), "command": args.command}
    if experiment == "drift":
        rate = args.rate
        phases = [
            Phase("SST-2", "sst2", rate, args.phase_s[0]),
            Phase("MRPC+RTE", "other", rate, args.phase_s[1]),
            Phase("SST-2 again", "sst2", rate, args.phase_s[2]),
        ]
        result["ladder_table"] = ladder_table(texts, args.ceiling)
        target = args.target_agreement
        controlled = run_variant(
            "controller",
            {
                "DEEBERT_TARGET_AGREEMENT": str(target),
                "DEEBERT_SHADOW_FRACTION": str(args.shadow_fraction),
                "DEEBERT_CONTROLLER_CEILING": args.ceiling,
            },
            phases,
            texts,
            args.seed,
            log_dir,
            placement,
        )
        held = [s["threshold"] for s in controlled["scrapes"] if s["t"] <= phases[0].duration_s and "threshold" in s]
        fixed_threshold = held[-1]
        fixed = run_variant(
            "fixed",
            {"DEEBERT_DEFAULT_THRESHOLD": repr(fixed_threshold), "DEEBERT_SHADOW_FRACTION": str(args.shadow_fraction)},
            phases,
            texts,
            args.seed,
            log_dir,
            placement,
        )
        drift_at = phases[0].duration_s
        reaction = first_move_after(controlled["scrapes"], drift_at, -1)
        facts.append(f"fixed threshold = the controller's at the end of the SST-2 phase: {fixed_threshold:.4f}")
        facts.append(
            "controller's first move down after the switch to MRPC+RTE text: "
            + (f"{reaction:.0f} s" if reaction is not None else "none")
        )
        if reaction is not None:
            after = {r["name"]: phase_summary(r, phases, reaction, only=phases[1].name)[0] for r in (controlled, fixed)}
            ours, theirs = after["controller"], after["fixed"]
            facts.append(
                f"MRPC+RTE phase from {reaction:.0f} s in: agreement controller "
                f"{percent(ours['agreement'])} vs fixed {percent(theirs['agreement'])} (target {percent(target)}), "
                "expected saving "
                f"controller {percent(ours['saving'])} vs fixed {percent(theirs['saving'])}"
            )
        back = first_move_after(controlled["scrapes"], drift_at + phases[1].duration_s, +1)
        facts.append("first move up after SST-2 text returned: " + (f"{back:.0f} s" if back is not None else "none"))
        result.update(title=f"Drift: agreement target {target} on {CHECKPOINT}, {rate:g} req/s", target=target)
        width = 10.0
    else:
        phases = [
            Phase("low", "sst2", args.low_rate, args.phase_s[0]),
            Phase("step", "sst2", args.high_rate, args.phase_s[1]),
            Phase("low again", "sst2", args.low_rate, args.phase_s[2]),
        ]
        target = args.target_p99_ms
        default = {} if args.default is None else {"DEEBERT_DEFAULT_THRESHOLD": args.default}
        controlled = run_variant(
            "controller",
            {"DEEBERT_TARGET_P99_MS": str(target), "DEEBERT_CONTROLLER_CEILING": args.ceiling, **default},
            phases,
            texts,
            args.seed,
            log_dir,
            placement,
        )
        fixed = run_variant("fixed", default, phases, texts, args.seed, log_dir, placement)
        step_at = phases[0].duration_s
        reaction = first_move_after(controlled["scrapes"], step_at, +1)
        facts.append(f"fixed threshold = the configured default: {fixed['default_threshold']:.4f}")
        facts.append(
            "controller's first move up after the step: " + (f"{reaction:.0f} s" if reaction is not None else "none")
        )
        settled = {r["name"]: phase_summary(r, phases, 10.0, only=phases[1].name)[0] for r in (controlled, fixed)}
        ours, theirs = settled["controller"], settled["fixed"]
        facts.append(
            f"step phase from 10 s in: server p99 (what the target judges) controller "
            f"{number(ours['server_p99_ms'], 1)} ms vs fixed {number(theirs['server_p99_ms'], 1)} ms, client p99 "
            f"{number(ours['p99_ms'], 1)} vs {number(theirs['p99_ms'], 1)} ms (target {target:g} ms); "
            f"refused (429) controller {ours['refused']}, fixed {theirs['refused']}"
        )
        back = first_move_after(controlled["scrapes"], step_at + phases[1].duration_s, -1)
        facts.append("first move down after the load fell: " + (f"{back:.0f} s" if back is not None else "none"))
        result.update(title=f"Load step: p99 target {target:g} ms on {CHECKPOINT}", target=target)
        width = 5.0
    total = sum(p.duration_s for p in phases)
    for run in (controlled, fixed):
        run["phases"] = phase_summary(run, phases)
        run["bins"] = bins(run, width, total)
        moves = run["scrapes"][-1]["adjustments"] if run["scrapes"] else {}
        if run["name"] == "controller":
            facts.append("controller moves by reason: " + ", ".join(f"{k} {int(v)}" for k, v in moves.items() if v))
    result.update(phases=[asdict(p) for p in phases], runs=[controlled, fixed], facts=facts)
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("experiment", choices=("drift", "load-step"))
    parser.add_argument("--data", type=Path, default=DATA, help="GLUE data folder (sst2/, mrpc/, rte/)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ceiling", default="fast", help="DEEBERT_CONTROLLER_CEILING")
    parser.add_argument("--phase-s", type=float, nargs=3, default=None, help="the three phases' durations (s)")
    parser.add_argument("--rate", type=float, default=50.0, help="drift: requests/s")
    parser.add_argument("--target-agreement", type=float, default=0.95)
    parser.add_argument("--shadow-fraction", type=float, default=0.5)
    parser.add_argument("--low-rate", type=float, default=60.0, help="load-step: requests/s before and after")
    parser.add_argument("--high-rate", type=float, default=200.0, help="load-step: requests/s in the step")
    parser.add_argument("--target-p99-ms", type=float, default=100.0)
    parser.add_argument(
        "--default", help="load-step: DEEBERT_DEFAULT_THRESHOLD of both variants (default: the server's, balanced)"
    )
    parser.add_argument("--server-cpus", help="run each server on these CPUs (taskset list, e.g. 1)")
    parser.add_argument("--client-cpus", help="run the load generator on these CPUs (e.g. 0)")
    parser.add_argument("--server-threads", type=int, help="DEEBERT_THREADS of the servers")
    parser.add_argument("--render", action="store_true", help="only redraw the figure and summary from the JSON")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    stem = args.experiment.replace("-", "_")
    if args.render:  # the summary and figure again, from the stored JSON of an earlier run
        result = json.loads((args.output / f"{stem}.json").read_text())
        plot(args.experiment, result, args.output / f"{stem}.png")
        summary = summarize(args.experiment, result)
        (args.output / f"{stem}.md").write_text(summary)
        print(summary)
        return 0
    if args.phase_s is None:
        args.phase_s = [120.0, 120.0, 90.0] if args.experiment == "drift" else [40.0, 60.0, 50.0]
    args.command = shlex.join(
        ["python", "-m", "benchmarks.controller_run", *(argv if argv is not None else sys.argv[1:])]
    )
    result = run_experiment(args.experiment, args)
    args.output.mkdir(parents=True, exist_ok=True)
    # Per-request records (without the texts) beside the JSON, compressed: the summary can be recomputed.
    with gzip.open(args.output / f"{stem}_requests.jsonl.gz", "wt") as records:
        for run in result["runs"]:
            for sent in run.pop("sent"):
                records.write(json.dumps({"variant": run["name"], **{k: v for k, v in sent.items() if k != "text"}}))
                records.write("\n")
    for run in result["runs"]:
        run["requests"] = sum(row["requests"] for row in run["phases"])
    (args.output / f"{stem}.json").write_text(json.dumps(result, indent=1))
    plot(args.experiment, result, args.output / f"{stem}.png")
    summary = summarize(args.experiment, result)
    (args.output / f"{stem}.md").write_text(summary)
    print(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
