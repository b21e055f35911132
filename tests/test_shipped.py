"""The shipped SST-2 checkpoint: loads offline, classifies known sentences, carries calibrated presets."""

from __future__ import annotations

from pathlib import Path

import pytest

from model.checkpoint import load_model
from model.tokenization import load_tokenizer, pad_batch, tokenize

SHIPPED = Path(__file__).resolve().parents[1] / "weights" / "sst2-minilm-l6"
KNOWN = [
    ("a gripping , beautifully acted and deeply moving film .", "positive"),
    ("one of the best movies of the year , funny and warm .", "positive"),
    ("a dull , lifeless mess that wastes its talented cast .", "negative"),
    ("the plot is boring and the jokes fall flat .", "negative"),
]

pytestmark = pytest.mark.shipped


def test_known_sentences_at_full_depth() -> None:
    model = load_model(SHIPPED)
    tokenizer = load_tokenizer(SHIPPED)
    batch = pad_batch(tokenize(tokenizer, [t for t, _ in KNOWN], None, model.config.max_length), tokenizer.pad_token_id)
    result = model.infer(batch.input_ids, batch.attention_mask, batch.token_type_ids, [0.0] * len(KNOWN))
    assert [model.config.labels[i] for i in result.label] == [label for _, label in KNOWN]
    assert result.exit_layer == [model.num_layers] * len(KNOWN)
    assert min(float(p.max()) for p in result.probabilities) > 0.8


def test_shipped_checkpoint_has_calibrated_presets() -> None:
    config = load_model(SHIPPED).config
    assert config.labels == ["negative", "positive"] and config.num_layers == 6
    presets = {p.name: p for p in config.presets}
    assert set(presets) == {"lossless", "balanced", "fast"}
    assert 0 < presets["lossless"].threshold <= presets["balanced"].threshold <= presets["fast"].threshold


MRPC = SHIPPED.parent / "mrpc-minilm-l6"
PAIRS = [
    ("The company said profits rose 10 percent in the third quarter .",
     "Profits at the company increased by 10 percent in the third quarter , it said .", "paraphrase"),
    ("The cat sat on the mat all afternoon .",
     "Stock markets in Asia fell sharply on Tuesday after the announcement .", "not_paraphrase"),
    ("He was arrested in Paris on Monday .", "Police arrested him in Paris on Monday .", "paraphrase"),
    ("The senator voted against the bill .", "The weather in Chicago was cold and windy .", "not_paraphrase"),
]  # fmt: skip


@pytest.mark.anyio
async def test_mrpc_checkpoint_serves_sentence_pairs_over_http() -> None:
    """The second shipped checkpoint through the real server: `text_pair`, TEI-style `[[a, b]]`, presets."""
    from server.engine import Engine
    from tests.server_helpers import make_app, serving, settings

    engine = Engine.load(settings(checkpoint=str(MRPC), device="cpu"))
    async with serving(make_app(engine, warmup=True)) as client:
        info = (await client.get("/v1/model")).json()
        assert info["task"] == "text-pair-classification" and info["labels"] == ["not_paraphrase", "paraphrase"]
        assert {p["name"] for p in info["presets"]} == {"lossless", "balanced", "fast"}
        body = {"texts": [a for a, _, _ in PAIRS], "text_pairs": [b for _, b, _ in PAIRS]}
        full = await client.post("/v1/classify", json=body, headers={"X-Exit-Threshold": "0"})
        assert full.status_code == 200, full.text
        assert [r["label"] for r in full.json()["results"]] == [label for _, _, label in PAIRS]
        assert {r["exit_layer"] for r in full.json()["results"]} == {6}
        tei = await client.post("/predict", json={"inputs": [[a, b] for a, b, _ in PAIRS]})
        assert tei.status_code == 200, tei.text
        top = [max(scores, key=lambda s: s["score"])["label"] for scores in tei.json()]
        assert top == [label for _, _, label in PAIRS]
        single = await client.post("/v1/classify", json={"text": PAIRS[0][0]})
        assert single.status_code == 422  # a pair model needs the second sentence
