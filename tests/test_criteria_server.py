"""A checkpoint calibrated for another exit criterion is served with that criterion's thresholds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model.config import Preset
from model.tokenization import load_tokenizer
from server.engine import Engine
from tests.helpers import tiny_model
from tests.server_helpers import make_app, serving


def patience_engine(tokenizer_dir: Path) -> Engine:
    model = tiny_model("bert")
    model.config = model.config.with_presets([Preset("balanced", 2.0, 0.9, 0.5)], exit_criterion="patience")
    return Engine(model, load_tokenizer(tokenizer_dir), device=torch.device("cpu"))


@pytest.mark.anyio
async def test_patience_checkpoint_takes_whole_layer_counts(tokenizer_dir: Path) -> None:
    app = make_app(patience_engine(tokenizer_dir), warmup=True)
    async with serving(app) as client:
        info = (await client.get("/v1/model")).json()
        assert info["exit_criterion"] == "patience" and info["default_threshold"] == 2.0
        texts = {"texts": ["good film", "a dull and boring plot"]}
        answers = {}
        for threshold in ("1", "2", "0", "balanced"):
            response = await client.post("/v1/classify", json=texts, headers={"X-Exit-Threshold": threshold})
            assert response.status_code == 200, response.text
            answers[threshold] = [r["exit_layer"] for r in response.json()["results"]]
        # The tiny model's off-ramps all say label 0: patience k exits at layer k; 0 is full depth.
        assert answers == {"1": [1, 1], "2": [2, 2], "0": [4, 4], "balanced": [2, 2]}
        for bad in ("1.5", "-1"):
            response = await client.post("/v1/classify", json=texts, headers={"X-Exit-Threshold": bad})
            assert response.status_code == 422
            assert response.json()["error_type"] == "invalid_threshold"
            assert "whole number" in response.json()["error"]


@pytest.mark.anyio
async def test_a_threshold_of_the_wrong_type_is_explained_in_the_checkpoints_criterion(tokenizer_dir: Path) -> None:
    from tests.server_helpers import tiny_engine

    messages = {}
    for name, engine in (("patience", patience_engine(tokenizer_dir)), ("entropy", tiny_engine(tokenizer_dir))):
        async with serving(make_app(engine)) as client:
            response = await client.post("/v1/classify", json={"text": "good film", "threshold": [1]})
        assert response.status_code == 422 and response.json()["error_type"] == "invalid_threshold"
        messages[name] = response.json()["error"]
    assert "patience" in messages["patience"] and "whole number" in messages["patience"]
    assert "entropy" in messages["entropy"] and "nats" in messages["entropy"]
    assert "entropy" not in messages["patience"]
