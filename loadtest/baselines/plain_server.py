"""BASELINE, not the product: the endpoint a user would write instead of deebert, for the benchmarks.

A minimal FastAPI app that runs the same checkpoint's weights as a plain full forward pass (encoder + final
classifier, every layer for every text: no early exit, no batching), one request at a time: on PyTorch (the
plain transformers endpoint, `--backend torch`) or on ONNX Runtime (`--backend onnxruntime`: the BERT-fused fp32
graph a user would export and serve, the same plain graph deebert's ONNX Runtime backend uses at full depth).
It answers `POST /v1/classify` with the subset of deebert's shape that the load generator reads
(`{"texts": [...]}` -> `{"results": [{"label", "label_id", "score", "exit_layer": n}]}`), ignores
`X-Exit-Threshold`, and has no `/metrics`.

    python -m loadtest.baselines.plain_server --checkpoint weights/sst2-minilm-l6 --port 8001
    python -m loadtest.baselines.plain_server --checkpoint weights/sst2-minilm-l6 --port 8002 --backend onnxruntime
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from model.backends import ExitModel, load_backend
from model.checkpoint import load_model
from model.device import pick_device, pick_dtype, prepare
from model.tokenization import load_tokenizer, pad_batch, tokenize
from server.protocol import CLASSIFY_PATH, COMPUTE_TIME_HEADER, LIVE_PATH, MODEL_PATH, READY_PATH, TOTAL_TIME_HEADER


class ClassifyBody(BaseModel):
    """The part of deebert's request body the baseline understands."""

    texts: list[str] = Field(min_length=1, max_length=64)
    text_pairs: list[str] | None = None


def create_app(
    checkpoint: str,
    device: str = "auto",
    dtype: str = "auto",
    backend: str = "torch",
    threads: int | None = None,
    precision: str = "fp32",
) -> FastAPI:
    """The baseline app with the checkpoint loaded in eval mode, on the device and dtype `deebert serve` would
    pick for the same words (auto: CUDA in float16 when available, else CPU in float32); with `backend`
    onnxruntime, its plain fused fp32 graph on ONNX Runtime (exported on first use into deebert's cache); with
    openvino, the plain graph compiled by OpenVINO in `precision` (fp32 or bf16)."""
    target = pick_device(device)
    prepare(target)  # the same attention kernels as `deebert serve`
    torch_model = load_model(checkpoint, dtype=pick_dtype(dtype, target)).to(target)
    model: ExitModel = torch_model
    if backend != "torch":
        model = load_backend(torch_model, backend, precision, threads=threads)
    tokenizer = load_tokenizer(checkpoint)
    config = model.config
    runtime = {"onnxruntime": "ONNX Runtime", "openvino": f"OpenVINO {precision}"}.get(backend)
    name = f"plain {runtime} baseline" if runtime else "plain baseline"
    lock = threading.Lock()
    app = FastAPI(title=f"{name} (not deebert)")

    # A sync endpoint runs in FastAPI's thread pool; the lock makes it one forward at a time, as a plain
    # endpoint without a batcher is.
    @app.post(CLASSIFY_PATH)
    def classify(body: ClassifyBody) -> JSONResponse:
        started = time.perf_counter()
        if body.text_pairs is not None and len(body.text_pairs) != len(body.texts):
            raise HTTPException(422, f"{len(body.texts)} texts but {len(body.text_pairs)} text_pairs")
        encoded = tokenize(tokenizer, body.texts, body.text_pairs, config.max_length)
        batch = pad_batch(encoded, tokenizer.pad_token_id).to(target)
        with lock:
            compute_started = time.perf_counter()
            with torch.inference_mode():
                logits = model.plain_forward(batch.input_ids, batch.attention_mask, batch.token_type_ids)
            probabilities = torch.softmax(logits.float(), dim=-1).tolist()
            compute_ms = 1000 * (time.perf_counter() - compute_started)
        results: list[dict[str, Any]] = []
        for row in probabilities:
            label_id = max(range(len(row)), key=row.__getitem__)
            results.append(
                {
                    "label": config.labels[label_id],
                    "label_id": label_id,
                    "score": row[label_id],
                    "exit_layer": config.num_layers,
                }
            )
        content = {"model": f"{config.name} ({name})", "num_layers": config.num_layers, "results": results}
        headers = {
            COMPUTE_TIME_HEADER: f"{compute_ms:.3f}",
            TOTAL_TIME_HEADER: f"{1000 * (time.perf_counter() - started):.3f}",
        }
        return JSONResponse(content, headers=headers)

    @app.get(MODEL_PATH)
    def model_info() -> dict[str, Any]:
        return {
            "model": f"{config.name} ({name})",
            "labels": config.labels,
            "num_layers": config.num_layers,
            "max_length": config.max_length,
            "presets": [],
            "baseline": True,
            "backend": model.backend,
            "device": str(model.device),
            "dtype": model.precision,
        }

    @app.get(LIVE_PATH)
    def live() -> dict[str, str]:
        return {"status": "alive"}

    @app.get(READY_PATH)
    def ready() -> dict[str, str]:
        return {"status": "ready"}

    return app


def main(argv: Sequence[str] | None = None) -> int:
    """Serve the baseline until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(prog="python -m loadtest.baselines.plain_server", description=__doc__)
    parser.add_argument("--checkpoint", required=True, help="DeeBERT checkpoint directory")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available, else CPU), cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto (float16 on CUDA, float32 on CPU), float32, ...")
    parser.add_argument(
        "--backend", default="torch", choices=["torch", "onnxruntime", "openvino"], help="runtime (torch)"
    )
    parser.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16", "int8"],
        help="onnxruntime: fp32 or int8; openvino: fp32 or bf16",
    )
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    app = create_app(args.checkpoint, args.device, args.dtype, args.backend, args.threads, args.precision)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
