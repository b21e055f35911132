"""Property tests (hypothesis) of threshold parsing: the one resolver the CLI, body and header share."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from model.config import Preset, UnknownPresetError
from server.errors import DeeBertError, ErrorType
from tests.helpers import tiny_model, write_vocab
from tests.server_helpers import tiny_engine

CONFIG = tiny_model("bert").config.with_presets(
    [Preset("lossless", 0.05), Preset("balanced", 0.2), Preset("fast", 0.5)]
)


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_numbers_are_accepted_exactly_when_finite_and_not_negative(value: float) -> None:
    if math.isfinite(value) and value >= 0:
        assert CONFIG.resolve_threshold(value) == (value, None)
        assert CONFIG.resolve_threshold(repr(value)) == (value, None)
    else:
        with pytest.raises(ValueError):
            CONFIG.resolve_threshold(value)
        with pytest.raises(ValueError):
            CONFIG.resolve_threshold(repr(value))


@given(st.text(max_size=40))
def test_any_string_is_a_preset_a_number_or_a_clear_refusal(text: str) -> None:
    try:
        threshold, preset = CONFIG.resolve_threshold(text)
    except UnknownPresetError as err:
        assert "neither a number nor a preset" in str(err)
        return
    except ValueError as err:  # a number that is negative, NaN or infinite
        assert "threshold must be" in str(err)
        return
    assert threshold >= 0 and math.isfinite(threshold)
    assert preset is None or preset == text.strip()


# Built at import (hypothesis tests take no function-scoped fixtures); removed when the test process exits.
_TOKENIZER_DIRECTORY = tempfile.TemporaryDirectory(prefix="deebert-tokenizer-")
_TOKENIZER_DIR = Path(_TOKENIZER_DIRECTORY.name)
write_vocab(_TOKENIZER_DIR)
ENGINE = tiny_engine(_TOKENIZER_DIR)  # a real engine on a tiny model; its presets: lossless, balanced, fast


@given(st.one_of(st.floats(), st.text(max_size=20), st.integers(), st.none()))
def test_the_engine_maps_every_refusal_to_a_4xx_error_type(value: object) -> None:
    engine = ENGINE
    try:
        resolved = engine.resolve_threshold(value)  # type: ignore[arg-type]
    except DeeBertError as err:
        assert err.error_type in (ErrorType.INVALID_THRESHOLD, ErrorType.UNKNOWN_PRESET)
        assert 400 <= err.status < 500
        return
    assert resolved.value >= 0 and math.isfinite(resolved.value)
