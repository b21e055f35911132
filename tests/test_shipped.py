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
