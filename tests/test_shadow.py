"""Shadow full-depth sampling: sampled early exits are re-run at full depth off the hot path and counted."""

from __future__ import annotations

import asyncio
import random
import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.engine import Engine, RowOutcome
from server.shadow import ShadowSampler
from tests.helpers import sentiment_rows
from tests.server_helpers import make_app, serving, tiny_engine

HUGE = "1000"  # every row leaves at layer 1
TEXTS = [row[0] for row in sentiment_rows(40)] + ["a", "the cat sat on the mat", "i hate that dog", "it is fine"]


class CountingEngine:
    """Wraps `full_depth_labels` to count the texts it re-ran."""

    def __init__(self, engine: Engine) -> None:
        self.texts = 0
        self._full = engine.full_depth_labels
        engine.full_depth_labels = self  # type: ignore[method-assign]

    def __call__(self, items: list[Any]) -> list[int]:
        self.texts += len(items)
        return self._full(items)


def agreement(page: str) -> dict[str, float]:
    return {a: float(v) for a, v in re.findall(r'^deebert_exit_agreement_total\{agree="(\w+)"\} (\S+)$', page, re.M)}


async def settle(client: httpx.AsyncClient, total: int) -> dict[str, float]:
    """The agreement counters once `total` texts are counted (shadow runs finish after the answers)."""
    counts: dict[str, float] = {}
    for _ in range(500):
        counts = agreement((await client.get("/metrics")).text)
        if sum(counts.values()) >= total:
            return counts
        await asyncio.sleep(0.01)
    return counts


def labels_at(engine: Engine, threshold: float) -> list[int]:
    """Each text's label when run alone at `threshold` (the reference to compare the server with)."""
    found: list[RowOutcome] = []
    for text in TEXTS:
        engine.run_batch(engine.tokenize([text], None, True), [threshold], lambda row, outcome: found.append(outcome))
    return [outcome.label_id for outcome in found]


def test_sampler_takes_its_fraction_and_counts_full_depth_exits_as_agreeing() -> None:
    compared: list[bool] = []
    sampler = ShadowSampler(0.25, 4, lambda items: [0] * len(items), compared.append, rng=random.Random(0))
    jobs = [sampler.sample(f"text {i}", exit_layer=2, label_id=1) for i in range(2000)]
    taken = [job for job in jobs if job is not None]
    assert 400 <= len(taken) <= 600, f"{len(taken)} of 2000 sampled at fraction 0.25"
    assert compared == [], "an early exit is only counted once its full-depth run is done"
    sampler.compare(taken[:3])
    assert compared == [False] * 3, "early label 1, full-depth label 0"
    everything = ShadowSampler(1.0, 4, lambda items: [], compared.append)
    assert everything.sample("t", exit_layer=4, label_id=0) is None and compared[-1] is True
    with pytest.raises(ValueError):
        ShadowSampler(1.5, 4, lambda items: [], compared.append)


@pytest.mark.anyio
async def test_shadow_is_off_by_default(tokenizer_dir: Path) -> None:
    engine = tiny_engine(tokenizer_dir)
    counting = CountingEngine(engine)
    async with serving(make_app(engine)) as client:
        response = await client.post("/v1/classify", json={"texts": TEXTS}, headers={"X-Exit-Threshold": HUGE})
        await asyncio.sleep(0.1)
        counts = agreement((await client.get("/metrics")).text)
    assert response.status_code == 200
    assert counts == {"true": 0.0, "false": 0.0} and counting.texts == 0


@pytest.mark.anyio
async def test_full_depth_answers_all_agree_without_a_second_run(tokenizer_dir: Path) -> None:
    engine = tiny_engine(tokenizer_dir)
    counting = CountingEngine(engine)
    async with serving(make_app(engine, shadow_fraction=1.0)) as client:
        response = await client.post("/v1/classify", json={"texts": TEXTS}, headers={"X-Exit-Threshold": "0"})
        counts = await settle(client, len(TEXTS))
    assert {r["exit_layer"] for r in response.json()["results"]} == {4}
    assert counts == {"true": len(TEXTS), "false": 0.0}
    assert counting.texts == 0, "a full-depth answer is the full model's answer: nothing to re-run"


@pytest.mark.anyio
async def test_early_exits_are_rerun_at_full_depth_and_disagreements_counted(
    tokenizer_dir: Path, one_thread: None
) -> None:
    engine = tiny_engine(tokenizer_dir, pooling="mean", seed=3)  # its labels at layers 1 and 4 differ on half
    early, full = labels_at(engine, float(HUGE)), labels_at(engine, 0.0)
    expected_disagree = sum(e != f for e, f in zip(early, full, strict=True))
    assert 0 < expected_disagree < len(TEXTS), "the tiny model's layer 1 and layer 4 must disagree on some texts"
    counting = CountingEngine(engine)
    async with serving(make_app(engine, shadow_fraction=1.0)) as client:
        answers = await asyncio.gather(
            *(client.post("/v1/classify", json={"text": t}, headers={"X-Exit-Threshold": HUGE}) for t in TEXTS)
        )
        counts = await settle(client, len(TEXTS))
        page = (await client.get("/metrics")).text
    assert [a.json()["results"][0]["label_id"] for a in answers] == early
    assert all(a.json()["results"][0]["exit_layer"] == 1 for a in answers)
    assert counts == {"true": len(TEXTS) - expected_disagree, "false": expected_disagree}
    assert counting.texts == len(TEXTS)
    assert "deebert_shadow_dropped_total 0.0" in page
