"""Static int8: activation ranges measured once on calibration texts and stored in the checkpoint, and the
QDQ step graphs built from them.

Dynamic quantization (ONNX Runtime's `int8`) scales each call's activations over the whole batch, so an answer
can depend on the other rows of its batch. Here every quantized matrix product's input range is fixed at
calibration (min/max over the texts, each run alone and unpadded), so an int8 answer is the same at every batch
size. The ranges are keyed by the traced graph's tensor names and stored in `config.json` (`int8_ranges`):
`deebert serve` builds the int8 graphs on first start without the calibration data.

Quantized (`ops`): the feed-forward pair of every encoder layer (`ffn`, the default: of the quantizations
tried it lost the least accuracy) or every product with a weight (`all`: attention projections too); weights
int8 per output channel, activations uint8. Attention's score products, the embeddings and the off-ramps stay
fp32, so the exit decisions see fp32 logits. The graphs are standard ONNX with
QuantizeLinear/DequantizeLinear pairs (QDQ): the same graph runs on ONNX Runtime and on OpenVINO.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger("deebert.int8")

PRECISION = "int8-static"


class QuantizationError(RuntimeError):
    """Static int8 cannot be built (no ranges, or ranges traced from another graph)."""


OPS = ("ffn", "all")
# The feed-forward pair's traced module names: BERT, RoBERTa, XLM-R, ELECTRA and DeBERTa (`intermediate.dense`,
# then the layer's own `output.dense`, not the attention's), DistilBERT (`ffn.lin1/2`), ModernBERT (`mlp.Wi/Wo`).
FFN_MODULES = ("/intermediate/dense/", "/output/dense/", "/ffn/lin1/", "/ffn/lin2/", "/mlp/Wi/", "/mlp/Wo/")


def weight_matmuls(graph: Any, ops: str = "all") -> list[Any]:
    """The MatMul nodes of `graph` that multiply an activation by a weight (an initializer); with `ffn` only each
    layer's feed-forward pair (FFN_MODULES: the traced module names of every supported architecture)."""
    initializers = {i.name for i in graph.initializer}
    nodes = [n for n in graph.node if n.op_type == "MatMul" and len(n.input) == 2 and n.input[1] in initializers]
    if ops == "all":
        return nodes
    return [n for n in nodes if any(module in n.name for module in FFN_MODULES) and "/attention/" not in n.name]


def calibrate_ranges(model: Any, encoded: Sequence[Any], ops: str = "ffn", progress: bool = False) -> dict[str, Any]:
    """Each weight product's input range over `encoded` (each text alone, unpadded), as `int8_ranges`, with
    which products `ops` quantizes."""
    import onnx
    import onnxruntime as ort
    from tqdm import tqdm

    from model.onnx_backend import session_options
    from model.onnx_export import GRAPH_FORMAT, trace_whole

    if not encoded:
        raise QuantizationError("no calibration texts")
    with tempfile.TemporaryDirectory() as scratch:
        whole = Path(scratch) / "whole.onnx"
        trace_whole(model, whole)
        graph_model = onnx.load(str(whole))
        chosen = weight_matmuls(graph_model.graph, ops)
        if not chosen:
            raise QuantizationError(f"no {ops} matrix products found in the traced graph")
        names = sorted({node.input[0] for node in chosen})
        outputs = {o.name for o in graph_model.graph.output}
        for name in names:
            if name not in outputs:
                graph_model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
        onnx.save(graph_model, str(whole))
        # The process's session options: once a session runs on ONNX Runtime's global thread pool, a session
        # with threads of its own is refused.
        session = ort.InferenceSession(str(whole), session_options(None), providers=["CPUExecutionProvider"])
        accepted = {i.name for i in session.get_inputs()}  # token types are traced away where a model has none
        lowest = dict.fromkeys(names, np.inf)
        highest = dict.fromkeys(names, -np.inf)
        rows = tqdm(encoded, desc="int8 ranges", unit="text", disable=not progress)
        for item in rows:
            ids = np.array([item.input_ids], dtype=np.int64)
            feeds = {
                "input_ids": ids,
                "attention_mask": np.ones_like(ids),
                "token_type_ids": np.array([item.token_type_ids], dtype=np.int64),
            }
            feeds = {name: value for name, value in feeds.items() if name in accepted}
            for name, value in zip(names, session.run(names, feeds), strict=True):
                lowest[name] = min(lowest[name], float(value.min()))
                highest[name] = max(highest[name], float(value.max()))
    ranges = {name: [lowest[name], highest[name]] for name in names}
    return {"graph_format": GRAPH_FORMAT, "method": "minmax", "ops": ops, "texts": len(encoded), "ranges": ranges}


def ranges_digest(int8_ranges: dict[str, Any]) -> str:
    """A digest of the stored ranges (the int8 graphs' cache key has it: recalibrating builds new graphs)."""
    return hashlib.sha256(json.dumps(int8_ranges, sort_keys=True).encode()).hexdigest()


def check_ranges(int8_ranges: dict[str, Any]) -> tuple[dict[str, list[float]], str]:
    """The stored ranges, if they were traced from the graphs this version writes; QuantizationError else."""
    from model.onnx_export import GRAPH_FORMAT

    if not int8_ranges or not int8_ranges.get("ranges"):
        raise QuantizationError(
            "the checkpoint has no int8 activation ranges: deebert calibrate --precision int8-static "
            "--calibration-data FILE stores them"
        )
    if int8_ranges.get("graph_format") != GRAPH_FORMAT:
        raise QuantizationError(
            f"the checkpoint's int8 ranges were measured on graph format {int8_ranges.get('graph_format')}, "
            f"this version writes {GRAPH_FORMAT}: run deebert calibrate --precision int8-static again"
        )
    ranges = {str(k): [float(v[0]), float(v[1])] for k, v in int8_ranges["ranges"].items()}
    return ranges, str(int8_ranges.get("ops", "all"))


def quantize_graph(path: Path, ranges: dict[str, list[float]], ops: str = "ffn") -> int:
    """Rewrite the ONNX graph at `path` with QDQ around its weight products; how many were quantized."""
    import onnx
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorsData
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer

    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    nodes = [n for n in weight_matmuls(model.graph, ops) if n.input[0] in ranges]
    missing = [n.input[0] for n in weight_matmuls(model.graph, ops) if n.input[0] not in ranges]
    if missing:
        raise QuantizationError(f"{path.name}: no stored range for {missing[:3]}: recalibrate")
    if not nodes:
        return 0
    # Ranges of every tensor the quantizer may ask about: the products' inputs (stored) and nothing else, so
    # only those products are quantized.
    wanted = {n.input[0] for n in nodes}
    tensors = TensorsData(
        CalibrationMethod.MinMax,
        {k: (np.float32(v[0]), np.float32(v[1])) for k, v in ranges.items() if k in wanted},
    )
    quantizer = QDQQuantizer(
        model,
        True,  # per-channel weights
        False,  # no reduced range
        QuantType.QInt8,
        QuantType.QUInt8,
        tensors,
        [n.name for n in nodes],
        [],
        ["MatMul"],
        {"DedicatedQDQPair": True, "OpTypesToExcludeOutputQuantization": ["MatMul"]},
    )
    quantizer.quantize_model()
    quantizer.model.save_model_to_file(str(path))
    return len(nodes)
