from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import BertTokenizerFast

from model.checkpoint import save_model
from model.modeling import DeeBert
from tests.helpers import tiny_model, write_vocab


@pytest.fixture(scope="session", autouse=True)
def onnx_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Exported ONNX graphs go to a temporary cache (servers the tests start inherit it), not the user's."""
    directory = tmp_path_factory.mktemp("deebert-cache")
    # Servers the tests start serve `auto` without a tune at start: which runtime a timing picks is not the
    # tests' business (test_tune.py runs the tune itself), and each tiny checkpoint would tune anew.
    values = {"DEEBERT_CACHE_DIR": str(directory), "DEEBERT_TUNE_BUDGET_S": "0"}
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    yield directory
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture
def anyio_backend() -> str:
    """Async tests (`pytest.mark.anyio`) run on asyncio, the loop the server runs on."""
    return "asyncio"


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tokenizer")
    write_vocab(directory)
    return directory


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir: Path) -> BertTokenizerFast:
    from model.tokenization import load_tokenizer

    return load_tokenizer(tokenizer_dir)  # type: ignore[return-value]


@pytest.fixture(params=["bert", "roberta"])
def any_model(request: pytest.FixtureRequest) -> DeeBert:
    return tiny_model(request.param)


@pytest.fixture
def tiny_checkpoint(tmp_path: Path, tokenizer: BertTokenizerFast) -> Path:
    """A saved tiny DeeBERT checkpoint directory with presets."""
    from model.config import Preset

    model = tiny_model("bert")
    model.config = model.config.with_presets(
        [Preset("lossless", 0.05, 1.0, 0.1), Preset("balanced", 0.2, 0.9, 0.3), Preset("fast", 0.5, 0.8, 0.6)]
    )
    directory = tmp_path / "tiny-checkpoint"
    save_model(model, directory, tokenizer=tokenizer)
    return directory


@pytest.fixture
def one_thread() -> Iterator[None]:
    """torch on one intra-op thread for the test: two threads on two shared cores make batches tens of times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
