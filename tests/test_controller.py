"""The threshold controller: deterministic runs over a fake clock and a fake agreement stream, its state file,
and the server wiring (ladder evidence from the engine, pinned requests untouched, what /v1/model and
/metrics show)."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import re
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from model import exit_rule
from model.tokenization import Encoded, pad_batch
from server.controller import LadderEvidence, Reason, Targets, ThresholdController, wilson_interval
from server.engine import Engine
from server.settings import ServerSettings
from tests.server_helpers import make_app, serving, tiny_engine

LADDER = [round(0.05 * i, 2) for i in range(11)]  # 0 (full depth) .. 0.5 (ceiling)
# True agreement with the full model per rung: 1 at full depth, falling toward the ceiling.
CALM = [1.0, 1.0, 0.999, 0.998, 0.998, 0.997, 0.98, 0.95, 0.9, 0.85, 0.8]
# Another distribution (drift): agreement falls much faster with the rung.
DRIFTED = [1.0, 0.997, 0.97, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def sample(agreement: Sequence[float], rng: random.Random) -> LadderEvidence:
    """One text's evidence with the given agreement per rung; coupled (one draw), so a text that agrees at a rung
    agrees at every less aggressive rung, as early-exit answers tend to."""
    draw = rng.random()
    agrees = tuple(draw < p for p in agreement)
    return LadderEvidence(agrees, tuple(max(1, 6 - rung // 2) for rung in range(len(agreement))))


def controller(start: int, clock: FakeClock, **targets: float) -> ThresholdController:
    return ThresholdController(LADDER, start, Targets(**targets), num_layers=6, clock=clock)


def run(
    ctl: ThresholdController,
    clock: FakeClock,
    agreement: Sequence[float],
    samples: int,
    rng: random.Random,
    per_tick: int = 10,
) -> list[int]:
    """Feed `samples` texts of evidence, ticking every `per_tick` texts (1 s apart); the rung after each tick."""
    rungs = []
    for _ in range(samples // per_tick):
        for _ in range(per_tick):
            ctl.record_evidence(sample(agreement, rng))
        clock.now += 1.0
        ctl.tick()
        rungs.append(ctl.rung)
    return rungs


def reversals(rungs: Sequence[int]) -> int:
    """How often the direction of movement changed (up then down or down then up)."""
    moves = [b - a for a, b in itertools.pairwise(rungs) if b != a]
    return sum(1 for a, b in itertools.pairwise(moves) if (a > 0) != (b > 0))


def test_wilson_interval_contains_the_estimate_and_narrows_with_samples() -> None:
    assert wilson_interval(0, 0) == (0.0, 1.0)
    few, many = wilson_interval(9, 10), wilson_interval(900, 1000)
    assert few[0] < 0.9 < few[1] and many[0] < 0.9 < many[1]
    assert many[1] - many[0] < few[1] - few[0]
    low, high = wilson_interval(1000, 1000)
    assert high == 1.0 and 0.99 < low < 1.0


def test_agreement_target_converges_from_above_and_from_below_without_oscillating() -> None:
    # Rungs 0-5 agree >= 0.997, rung 6 agrees 0.98: holding 0.99 with confidence means settling on rung 5.
    for start in (9, 0):
        clock, rng = FakeClock(), random.Random(start)
        ctl = controller(start, clock, agreement=0.99)
        rungs = run(ctl, clock, CALM, 6000, rng)
        assert rungs[-1] == 5, f"from rung {start}: ended on {rungs[-1]} ({ctl.adjustments})"
        assert max(rungs[len(rungs) // 2 :]) <= 5, "never past the last rung that holds the target, once settled"
        assert reversals(rungs) <= 1, f"from rung {start}: oscillated {rungs}"
        assert len(ctl.adjustments) <= 4
        reasons = {a.reason for a in ctl.adjustments}
        assert reasons == ({Reason.AGREEMENT_LOW} if start == 9 else {Reason.AGREEMENT_ROOM})


def test_a_handful_of_samples_cannot_move_it() -> None:
    clock, rng = FakeClock(), random.Random(1)
    ctl = controller(4, clock, agreement=0.99)
    # 20 samples that all disagree beyond rung 1: fewer than min_samples, so no move yet.
    for _ in range(20):
        ctl.record_evidence(LadderEvidence((True, True) + (False,) * 9, (6,) * 11))
    clock.now += 10
    assert ctl.tick() == [] and ctl.rung == 4
    # All agree everywhere, but only 40 samples: the interval is too wide to claim 0.99 anywhere new.
    ctl2 = controller(4, clock, agreement=0.99)
    for _ in range(40):
        ctl2.record_evidence(sample([1.0] * 11, rng))
    clock.now += 10
    assert ctl2.tick() == [] and ctl2.rung == 4


def test_drift_lowers_the_default_quickly_and_it_comes_back_after() -> None:
    clock, rng = FakeClock(), random.Random(2)
    ctl = controller(5, clock, agreement=0.99)
    run(ctl, clock, CALM, 3000, rng)
    assert ctl.rung == 5
    drifted = run(ctl, clock, DRIFTED, 1500, rng)
    first_low = next(i for i, rung in enumerate(drifted) if rung <= 2)
    assert first_low * 10 <= 150, f"drift took {first_low * 10} samples to act on"
    assert drifted[-1] == 1, f"on drifted text only rung 1 holds 0.99 ({ctl.adjustments[-3:]})"
    # While the drift lasts it never climbs back, though the long window still remembers the calm traffic.
    assert all(b <= a for a, b in itertools.pairwise(drifted)), drifted
    calm_again = run(ctl, clock, CALM, 6000, rng)
    assert calm_again[-1] == 5
    assert all(a.evidence for a in ctl.adjustments)


def test_bounds_are_full_depth_and_the_ceiling() -> None:
    clock, rng = FakeClock(), random.Random(3)
    ctl = controller(3, clock, agreement=0.9)
    rungs = run(ctl, clock, [1.0] * 11, 4000, rng)
    assert max(rungs) == 10 and ctl.threshold == LADDER[-1], "everything agrees: up to the ceiling, not past it"
    clock2 = FakeClock()
    ctl2 = controller(6, clock2, agreement=0.9)
    rungs2 = run(ctl2, clock2, [1.0] + [0.0] * 10, 500, rng)
    assert min(rungs2) == 0 and ctl2.threshold == 0.0, "nothing agrees early: full depth"


def test_latency_target_steps_toward_the_ceiling_under_load_and_back_after() -> None:
    clock = FakeClock()
    ctl = controller(4, clock, p99_s=0.050)
    rungs = []
    for _ in range(20):  # overloaded: every request takes 80 ms
        for _ in range(30):
            ctl.record_latency(0.080)
        clock.now += 0.5
        ctl.tick()
        rungs.append(ctl.rung)
    assert rungs[:3] == [5, 7, 10], "1, 2, then 4 rungs (capped at the ceiling) while over the target"
    assert max(rungs) == 10, "never past the ceiling"
    assert ctl.adjustments[0].reason == Reason.LATENCY_HIGH and "p99 80.0 ms" in ctl.adjustments[0].evidence
    held = []
    for _ in range(10):  # between half the target and the target: hold (hysteresis)
        for _ in range(30):
            ctl.record_latency(0.040)
        clock.now += 0.5
        ctl.tick()
        held.append(ctl.rung)
    assert held == [10] * 10
    back = []
    for _ in range(40):  # load fell (a third of the requests): back one rung per recover_s (2 s), to the default
        for _ in range(10):
            ctl.record_latency(0.005)
        clock.now += 0.5
        ctl.tick()
        back.append(ctl.rung)
    assert back[-1] == 4 and min(back) == 4, "back to the configured default, not below it"
    assert reversals(rungs + held + back) == 1


def test_queue_wait_moves_it_before_the_p99_shows_the_overload() -> None:
    clock = FakeClock()
    ctl = controller(2, clock, p99_s=0.100)
    clock.now += 0.5
    assert [a.reason for a in ctl.tick(queue_wait_s=0.070)] == [Reason.LATENCY_HIGH]
    assert ctl.rung == 3 and "queue wait 70.0 ms" in ctl.adjustments[0].evidence


def test_with_both_targets_latency_stops_at_the_agreement_floor() -> None:
    clock, rng = FakeClock(), random.Random(4)
    ctl = controller(5, clock, agreement=0.99, p99_s=0.050, agreement_floor=0.94)
    run(ctl, clock, CALM, 3000, rng)
    assert ctl.rung == 5
    for _ in range(20):
        for _ in range(30):
            ctl.record_latency(0.2)
        for _ in range(10):
            ctl.record_evidence(sample(CALM, rng))
        clock.now += 0.5
        ctl.tick()
    # CALM agrees 0.95 at rung 7 (not shown below 0.94) and 0.9 at rung 8 (shown below): latency stops at 7.
    assert ctl.rung == 7, ctl.adjustments[-3:]
    # Without a floor of its own the agreement target is the floor: latency may not trade agreement at all
    # beyond rungs not shown below 0.99 (rung 6 agrees 0.98, shown below with this much evidence).
    clock2 = FakeClock()
    strict = controller(5, clock2, agreement=0.99, p99_s=0.050)
    run(strict, clock2, CALM, 3000, rng)
    for _ in range(20):
        for _ in range(30):
            strict.record_latency(0.2)
        clock2.now += 0.5
        strict.tick()
    assert strict.rung == 5


def test_targets_are_checked() -> None:
    with pytest.raises(ValueError):
        Targets(agreement=1.5)
    with pytest.raises(ValueError):
        Targets(p99_s=0)
    with pytest.raises(ValueError, match="floor"):
        Targets(agreement=0.9, agreement_floor=0.95)
    with pytest.raises(ValueError, match="ladder"):
        ThresholdController([0.0], 0, Targets(agreement=0.9), 6)
    ctl = controller(0, FakeClock(), agreement=0.9)
    with pytest.raises(ValueError, match="rungs"):
        ctl.record_evidence(LadderEvidence((True,), (1,)))


def test_state_file_resumes_the_default_and_its_evidence(tmp_path: Path) -> None:
    clock, rng = FakeClock(), random.Random(5)
    ctl = controller(9, clock, agreement=0.99)
    run(ctl, clock, CALM, 3000, rng)
    path = tmp_path / "state" / "controller.json"
    ctl.save(path, "model-a", "entropy")
    resumed = controller(3, FakeClock(), agreement=0.99)
    assert resumed.resume(path, "model-a", "entropy")
    assert resumed.rung == ctl.rung and resumed.samples == ctl.samples
    assert resumed.interval(resumed.rung) == ctl.interval(ctl.rung)
    assert resumed.adjustments[-1].reason == Reason.RESUMED
    # Another model's state, a corrupt file, or a missing one: ignored, the configured default kept.
    for model, content in (("model-b", None), ("model-a", "{not json")):
        if content is not None:
            path.write_text(content)
        other = controller(3, FakeClock(), agreement=0.99)
        assert not other.resume(path, model, "entropy") and other.rung == 3 and other.samples == 0
    assert not controller(3, FakeClock(), agreement=0.99).resume(tmp_path / "missing.json", "model-a", "entropy")


def test_settings_refuse_targets_that_contradict() -> None:
    with pytest.raises(ValueError, match="brownout"):
        ServerSettings(checkpoint="x", target_p99_ms=50, brownout_queue_wait_ms=20)
    with pytest.raises(ValueError, match="shadow"):
        ServerSettings(checkpoint="x", target_agreement=0.99, shadow_fraction=0)
    with pytest.raises(ValueError, match="target_p99_ms"):
        ServerSettings(checkpoint="x", agreement_floor=0.9)
    assert ServerSettings(checkpoint="x", target_agreement=0.99).effective_shadow_fraction == 0.1
    assert ServerSettings(checkpoint="x").effective_shadow_fraction == 0.0
    assert ServerSettings(checkpoint="x", target_agreement=0.99, shadow_fraction=0.5).effective_shadow_fraction == 0.5


# --- the server wiring ---------------------------------------------------------------------------------


def served_at(engine: Engine, items: list[Encoded], threshold: float) -> dict[int, tuple[int, int]]:
    """Per row: (exit layer, label) when the batch runs at `threshold`."""
    served: dict[int, tuple[int, int]] = {}
    engine.run_batch(
        items, [threshold] * len(items), lambda row, o: served.__setitem__(row, (o.exit_layer, o.label_id))
    )
    return served


def test_ladder_evidence_matches_what_each_rung_would_have_served(tokenizer_dir: Path) -> None:
    engine = tiny_engine(tokenizer_dir, sharpen=4.0, labels=("a", "b", "c"))  # off-ramps that disagree
    # Random token ids (the tiny vocabulary's words all tokenize alike), so the texts' outputs differ.
    generator = random.Random(0)
    items = []
    for _ in range(24):
        ids = [2, *(generator.randrange(5, 64) for _ in range(generator.randrange(2, 12))), 3]
        items.append(Encoded(ids, [0] * len(ids), len(ids)))
    batch = pad_batch(items, engine.pad_token_id)
    logits = engine.model.all_off_ramp_logits(batch.input_ids, batch.attention_mask, batch.token_type_ids)
    _, entropies = exit_rule.entropy_from_logits(logits)
    # Thresholds between the observed entropies, so the rungs exit the texts at different layers.
    ladder = [0.0, *sorted(set(torch.quantile(entropies.flatten(), torch.linspace(0.1, 0.9, 6)).tolist()))]
    evidence = engine.ladder_exits(items, ladder)
    full = [0] * len(items)
    engine.run_batch(items, [0.0] * len(items), lambda row, outcome: full.__setitem__(row, outcome.label_id))
    assert [proof.full_label for proof in evidence] == full
    layers_seen = set()
    for rung, threshold in enumerate(ladder):
        served = served_at(engine, items, threshold)
        for row, proof in enumerate(evidence):
            exit_layer, label = served[row]
            assert proof.exit_layers[rung] == exit_layer
            assert proof.agrees[rung] == (label == full[row])
            layers_seen.add(exit_layer)
    assert len(layers_seen) >= 2, "the test's thresholds should exit texts at several layers"
    flags = {agree for proof in evidence for agree in proof.agrees}
    assert flags == {True, False}, "some rungs should disagree with full depth, for the test to mean something"


def test_ladder_has_full_depth_presets_and_the_ceiling_as_rungs(tokenizer_dir: Path) -> None:
    engine = tiny_engine(tokenizer_dir)
    ladder = engine.threshold_ladder(engine.resolve_threshold("fast"))
    values = [rung.value for rung in ladder]
    assert values[0] == 0.0 and values[-1] == 0.5 and values == sorted(values)
    assert {rung.preset for rung in ladder} >= {"lossless", "balanced", "fast"}
    assert len(ladder) == 21
    with pytest.raises(ValueError):
        engine.threshold_ladder(engine.resolve_threshold(0.0))


def metric(page: str, name: str, labels: str = "") -> float:
    match = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", page, re.M)
    assert match, f"{name}{labels} not on the page"
    return float(match.group(1))


@pytest.mark.anyio
async def test_server_moves_unpinned_requests_only_and_shows_the_controller(tokenizer_dir: Path) -> None:
    engine = tiny_engine(tokenizer_dir)
    app = make_app(engine, target_agreement=0.9, controller_interval_s=0.02, shadow_fraction=1.0)
    async with serving(app) as client:
        state = app.state.deebert
        ctl = state.controller
        assert ctl is not None and ctl.threshold == 0.2, "starts at the configured default (balanced)"
        # Shadow samples reach the controller as ladder evidence (every sampled text, full-depth exits too).
        for index in range(6):
            assert (await client.post("/v1/classify", json={"texts": [f"text {index}"]})).status_code == 200
        for _ in range(300):
            if ctl.samples >= 6:
                break
            await asyncio.sleep(0.01)
        assert ctl.samples >= 6
        # Evidence that every rung agrees: the controller raises the default to the ceiling.
        for _ in range(400):
            ctl.record_evidence(LadderEvidence((True,) * len(ctl.ladder), (1,) * len(ctl.ladder)))
        for _ in range(300):
            if ctl.threshold == 0.5:
                break
            await asyncio.sleep(0.01)
        assert ctl.threshold == 0.5
        unpinned = (await client.post("/v1/classify", json={"texts": ["a"]})).json()
        header = await client.post("/v1/classify", json={"texts": ["a"]}, headers={"X-Exit-Threshold": "lossless"})
        body = (await client.post("/v1/classify", json={"texts": ["a"], "threshold": 0.1})).json()
        assert unpinned["threshold"] == 0.5
        assert header.json()["threshold"] == 0.05 and body["threshold"] == 0.1, "pinned requests are untouched"
        info = (await client.get("/v1/model")).json()
        assert info["default_threshold"] == 0.5 and info["default_threshold_name"] == "fast"
        assert info["controller"]["target_agreement"] == 0.9 and info["controller"]["configured_threshold"] == 0.2
        assert info["controller"]["samples"] >= 400
        page = (await client.get("/metrics")).text
        assert metric(page, "deebert_controller_threshold") == 0.5
        assert metric(page, "deebert_controller_adjustments_total", '{reason="agreement_room"}') >= 1
        assert metric(page, "deebert_controller_target", '{target="agreement"}') == 0.9
        assert metric(page, "deebert_controller_agreement", '{bound="estimate",window="100"}') == 1.0


@pytest.mark.anyio
async def test_server_without_targets_has_no_controller(tokenizer_dir: Path) -> None:
    app = make_app(tiny_engine(tokenizer_dir))
    async with serving(app) as client:
        assert app.state.deebert.controller is None
        info = (await client.get("/v1/model")).json()
        assert info["controller"] is None and info["default_threshold"] == 0.2
        assert metric((await client.get("/metrics")).text, "deebert_controller_threshold") == 0.2


@pytest.mark.anyio
async def test_server_saves_and_resumes_its_controller_state(tokenizer_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "controller.json"
    engine = tiny_engine(tokenizer_dir)
    options = {"target_agreement": 0.9, "controller_interval_s": 0.02, "controller_state": str(path)}
    app = make_app(engine, **options)
    async with serving(app):
        ctl = app.state.deebert.controller
        for _ in range(400):
            ctl.record_evidence(LadderEvidence((True,) * len(ctl.ladder), (1,) * len(ctl.ladder)))
        for _ in range(300):
            if path.exists() and json.loads(path.read_text())["threshold"] == 0.5:
                break
            await asyncio.sleep(0.01)
    saved = json.loads(path.read_text())
    assert saved["threshold"] == 0.5 and len(saved["evidence"]["agrees"]) == 400
    again = make_app(engine, **options)
    async with serving(again) as client:
        assert (await client.get("/v1/model")).json()["default_threshold"] == 0.5


def test_a_push_that_empties_the_queue_is_not_undone_while_the_window_remembers_the_load() -> None:
    clock = FakeClock()
    ctl = controller(4, clock, p99_s=0.050)

    def tick_with(seconds: float, ticks: int, per_tick: int = 30) -> list[int]:
        rungs = []
        for _ in range(ticks):
            for _ in range(per_tick):
                ctl.record_latency(seconds)
            clock.now += 0.5
            ctl.tick()
            rungs.append(ctl.rung)
        return rungs

    assert tick_with(0.080, 2) == [5, 7]
    # Fast again right after the push: the requests since it are calm, but the last 5 s are not.
    assert tick_with(0.010, 8) == [7] * 8
    # The window is calm now, but under the same request rate as at the push: it keeps the capacity the push
    # bought (stabilization) for latency_memory_s after the push...
    assert tick_with(0.010, 40) == [7] * 40
    # ...then probes back one rung per 2 s.
    assert tick_with(0.010, 12)[-1] < 7
    # A new overload starts again at one rung per tick: the calm ticks reset the doubling.
    before = ctl.rung
    assert tick_with(0.080, 2) == [before + 1, before + 3]
    # Once the request rate falls below 0.8 of the push's, it comes back without waiting out the 30 s.
    pushed_to = ctl.rung
    tick_with(0.010, 10, per_tick=30)  # the slow requests leave the 5 s window
    assert tick_with(0.010, 12, per_tick=10)[-1] < pushed_to


def test_the_latency_state_machine_goes_steady_pushed_recovering_steady() -> None:
    clock = FakeClock()
    ctl = controller(4, clock, p99_s=0.050)
    states: list[str] = []

    def tick_with(seconds: float, ticks: int, per_tick: int = 30) -> None:
        for _ in range(ticks):
            for _ in range(per_tick):
                ctl.record_latency(seconds)
            clock.now += 0.5
            ctl.tick()
            state = ctl.snapshot()["latency_state"]
            if not states or states[-1] != state:
                states.append(state)

    tick_with(0.010, 4)
    assert states == ["steady"] and ctl.rung == 4
    tick_with(0.080, 2)  # one rung, then two: the step doubles while the overload lasts
    assert states[-1] == "pushed" and ctl.rung == 7
    tick_with(0.010, 40, per_tick=2)  # the load fell: the rate is under 0.8 of the push's
    assert states == ["steady", "pushed", "recovering", "steady"], states
    assert ctl.rung == 4 and ctl.snapshot()["latency_rungs"] == 0
    reasons = [adjustment.reason for adjustment in ctl.adjustments]
    assert reasons == [Reason.LATENCY_HIGH] * 2 + [Reason.LATENCY_RECOVERED] * 3, reasons


def test_without_a_latency_target_there_is_no_latency_state() -> None:
    assert controller(4, FakeClock(), agreement=0.99).snapshot()["latency_state"] is None


def test_under_a_lasting_load_it_does_not_walk_back_into_the_rung_that_broke() -> None:
    """Rungs below 7 cannot carry the load (80 ms against a 50 ms target), rungs from 7 can (5 ms). Coming
    back on calm windows alone would step into rung 6 every ~10 s; after the first time, the controller
    stays above it for `latency_memory_s` and only then tries it again."""
    clock = FakeClock()
    ctl = controller(4, clock, p99_s=0.050)
    rungs = []
    for _ in range(240):  # 120 s of the same load
        for _ in range(30):
            ctl.record_latency(0.080 if ctl.rung < 7 else 0.005)
        clock.now += 0.5
        ctl.tick()
        rungs.append(ctl.rung)
    breaks = [a for a in ctl.adjustments if a.reason == Reason.LATENCY_HIGH and a.from_rung == 6]
    assert 1 <= len(breaks) <= 4, [(a.from_rung, a.to_rung) for a in ctl.adjustments]
    first = rungs.index(6)
    after = rungs[first + 2 : first + 2 + int(ctl.latency_memory_s / 0.5) - 2]
    assert min(after) >= 7, "held above the rung that broke while it remembers it"
    assert rungs[-1] >= 6


def test_under_a_lasting_load_the_probes_back_off() -> None:
    """Each probe that breaks the target again under the same load doubles the wait before the next one."""
    clock = FakeClock()
    ctl = controller(4, clock, p99_s=0.050)
    breaks = []
    for _ in range(1200):  # 600 s of the same load: rungs below 7 cannot carry it
        for _ in range(30):
            ctl.record_latency(0.080 if ctl.rung < 7 else 0.005)
        clock.now += 0.5
        for move in ctl.tick():
            if move.reason == Reason.LATENCY_HIGH and move.from_rung == 6:
                breaks.append(clock.now)
    gaps = [b - a for a, b in itertools.pairwise(breaks)]
    assert len(gaps) >= 2 and all(later > earlier for earlier, later in itertools.pairwise(gaps)), gaps
    assert len(breaks) <= 6, breaks
