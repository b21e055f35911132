"""Devices: what `auto`, `cpu` and `cuda` resolve to, and the CUDA path itself.

The CUDA tests need a GPU and are skipped where torch sees none (as in CI); on a GPU machine
`pytest tests/test_device.py` runs them: same answers as the CPU, a row's answer independent of its
batch-mates, the engine serving from the GPU, and batch-1 timing that waits for the GPU's queued work.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from deebert.cli import main
from model.device import DeviceError, describe_device, model_device, pick_device, pick_dtype, prepare
from model.evaluate import time_batch1
from model.modeling import DeeBert
from model.tokenization import Batch, load_tokenizer, tokenize
from server.engine import Engine, EngineLoadError, RowOutcome
from tests.helpers import SENTENCES, all_entropies, encode, sentiment_rows, tiny_model, write_tsv
from tests.server_helpers import settings

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error a machine without CUDA gives")


def mixed_thresholds(model: DeeBert, batch: Batch, margin: float) -> list[float]:
    """Odd rows leave where layer 2's entropy (+ margin) first allows it; even rows run to full depth."""
    entropies = all_entropies(model, batch)
    return [float(entropies[1, row]) + margin if row % 2 else 0.0 for row in range(batch.input_ids.shape[0])]


def infer(model: DeeBert, batch: Batch, thresholds: list[float]):  # type: ignore[no-untyped-def]
    on_device = batch.to(model_device(model))
    return model.infer(on_device.input_ids, on_device.attention_mask, on_device.token_type_ids, thresholds)


# --- choosing a device (every machine) ----------------------------------------------------------


def test_auto_picks_cuda_when_available_and_a_dtype_to_match() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert pick_device("auto").type == expected
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32
    assert pick_dtype("auto", torch.device("cuda")) == torch.float16
    assert pick_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    assert describe_device(torch.device("cpu")) == "cpu"


def test_bad_devices_and_dtypes_are_clear_errors() -> None:
    with pytest.raises(DeviceError, match="unknown device 'gpu0'"):
        pick_device("gpu0")
    with pytest.raises(DeviceError, match="unsupported device 'meta'"):
        pick_device("meta")
    with pytest.raises(DeviceError, match="unknown dtype 'int8'"):
        pick_dtype("int8", torch.device("cpu"))
    if torch.cuda.is_available():
        with pytest.raises(DeviceError, match="only"):
            pick_device(f"cuda:{torch.cuda.device_count()}")


def test_serving_on_cuda_turns_off_cudnn_attention() -> None:
    """cuDNN plans attention per input shape (tens of ms at each new length): CUDA serving does without it."""
    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        prepare(torch.device("cpu"))
        assert torch.backends.cuda.cudnn_sdp_enabled()
        prepare(torch.device("cuda"), cudnn_attention=True)
        assert torch.backends.cuda.cudnn_sdp_enabled()
        prepare(torch.device("cuda"))
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


@no_cuda
def test_asking_for_cuda_without_it_fails_cleanly(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(DeviceError, match="CUDA is not available"):
        pick_device("cuda")
    with pytest.raises(EngineLoadError, match="CUDA is not available"):
        Engine.load(settings(checkpoint=str(tiny_checkpoint), device="cuda"))
    dev = write_tsv(tmp_path / "dev.tsv", ["sentence", "label"], sentiment_rows(8))
    args = ["evaluate", "--checkpoint", str(tiny_checkpoint), "--data", str(dev), "--device", "cuda"]
    assert main([*args, "--output", str(tmp_path / "out"), "--no-progress"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


# --- the CUDA path (GPU machines) ---------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize(("model_type", "pooling"), [("bert", "first"), ("roberta", "mean")])
def test_cuda_answers_as_the_cpu_does(model_type: str, pooling: str, tokenizer) -> None:  # type: ignore[no-untyped-def]
    on_cpu = tiny_model(model_type, pooling=pooling)
    on_gpu = tiny_model(model_type, pooling=pooling).cuda()
    batch = encode(tokenizer)
    thresholds = mixed_thresholds(on_cpu, batch, margin=1e-3)
    cpu, gpu = infer(on_cpu, batch, thresholds), infer(on_gpu, batch, thresholds)
    assert gpu.exit_layer == cpu.exit_layer and gpu.label == cpu.label
    assert len(set(cpu.exit_layer)) > 1  # the thresholds really send rows out at different layers
    torch.testing.assert_close(gpu.probabilities, cpu.probabilities, atol=1e-4, rtol=0)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_row_answers_the_same_alone_or_in_any_batch_on_cuda(dtype: torch.dtype, tokenizer) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model("roberta", pooling="mean").to("cuda", dtype)
    batch = encode(tokenizer)
    # fp32 as the CPU promises (1e-4); fp16 kernels may round differently with the batch's shape.
    atol, margin = (1e-4, 1e-4) if dtype == torch.float32 else (5e-3, 2e-2)
    thresholds = mixed_thresholds(model, batch, margin)
    together = infer(model, batch, thresholds)
    for row, text in enumerate(SENTENCES):
        alone = infer(model, encode(tokenizer, [text]), [thresholds[row]])
        assert alone.exit_layer[0] == together.exit_layer[row]
        assert alone.label[0] == together.label[row]
        torch.testing.assert_close(alone.probabilities[0], together.probabilities[row], atol=atol, rtol=0)


def served(engine: Engine, items: list, thresholds: list[float]) -> dict[int, RowOutcome]:  # type: ignore[type-arg]
    outcomes: dict[int, RowOutcome] = {}
    engine.run_batch(items, thresholds, outcomes.__setitem__)
    return outcomes


@needs_cuda
def test_the_engine_serves_from_cuda(tiny_checkpoint: Path, tokenizer_dir: Path) -> None:
    engine = Engine.load(settings(checkpoint=str(tiny_checkpoint), device="cuda"))
    assert engine.device.type == "cuda" and engine.dtype_name == "float16"  # auto dtype on CUDA
    assert not torch.backends.cuda.cudnn_sdp_enabled()
    reference = Engine(tiny_model("bert"), load_tokenizer(tokenizer_dir), torch.device("cpu"))  # the same weights
    items = engine.tokenize(SENTENCES, None, truncate=True)
    for threshold, layer in ((0.0, engine.num_layers), (1e9, 1)):
        gpu = served(engine, items, [threshold] * len(items))
        cpu = served(reference, items, [threshold] * len(items))
        assert sorted(gpu) == sorted(cpu) == list(range(len(items)))
        for row, expected in cpu.items():
            # Served in fp16 on the GPU, the answers are the fp32 CPU's up to rounding.
            assert gpu[row].exit_layer == expected.exit_layer == layer
            assert gpu[row].label_id == expected.label_id
            assert gpu[row].probabilities == pytest.approx(expected.probabilities, abs=1e-2)


@needs_cuda
def test_batch1_timing_on_cuda_waits_for_the_gpu(tokenizer) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model("bert").cuda()
    encoded = tokenize(tokenizer, SENTENCES, None, 48)
    timing = time_batch1(model, encoded, tokenizer.pad_token_id, [0.0, 1e9], max_samples=4, progress=False)
    assert timing["device"].startswith("cuda:") and timing["dtype"] == "float32"
    assert timing["plain_ms"] > 0 and all(ms > 0 for ms in timing["exit_ms"])
    assert timing["expected_saving_on_timed"] == [0.0, 1.0 - 1 / model.num_layers]


@needs_cuda
def test_evaluate_runs_on_cuda_and_says_so(tiny_checkpoint: Path, tmp_path: Path) -> None:
    dev = write_tsv(tmp_path / "dev.tsv", ["sentence", "label"], sentiment_rows(24))
    out = tmp_path / "eval"
    args = ["evaluate", "--checkpoint", str(tiny_checkpoint), "--data", str(dev), "--device", "cuda"]
    assert main([*args, "--output", str(out), "--timing-samples", "4", "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["timing"]["device"].startswith("cuda:0 (") and report["timing"]["dtype"] == "float16"
    assert report["machine"]["accelerators"]
    assert len(report["per_layer_accuracy"]) == report["num_layers"]
