"""Export a DeeBERT model to ONNX graphs for the ONNX Runtime backend: one graph per step of the exit loop.

The whole model is traced once (embeddings → layer i → off-ramp i, every hidden state and every off-ramp's
logits as outputs), fused by ONNX Runtime's transformer optimizer (Attention, SkipLayerNormalization,
BiasGelu), then cut at the layer boundaries into the graphs the loop calls:

    layer_1.onnx    input_ids, token_type_ids, mask, pool_weights → hidden_1, logits_1   (embeddings + layer 1)
    layer_i.onnx    hidden_{i-1}, mask, pool_weights               → hidden_i, logits_i   (i = 2..n-1)
    layer_n.onnx    hidden_{n-1}, mask, pool_weights               → logits_n  (layer n + the final classifier)
    layer_i.packed.onnx  the same, and the token indices → the same; the position-wise work on the batch's real
                    tokens only (`pack_tokens`; fp32 only), for calls with much padding
    plain.onnx      input_ids, attention_mask, token_type_ids      → logits_n  (a plain full forward)
    exit.onnx       layer 1's inputs, exit_threshold               → exit_logits, exit_layer  (`write_exit_graph`:
                    the layer graphs nested in `If` nodes, a lone row's whole exit loop in one call)

where a layer's mask is fused attention's token count per row and pool_weights mean pooling's per-token
weights (both computed once per batch by the loop rather than in every layer; no pool_weights when the
off-ramps pool the first token), and logits_i are off-ramp i's, computed in the same call as the layer they
follow.
Cutting the fused whole (rather than exporting each piece alone) lets the optimizer see the patterns it knows.
Two details make it fuse every layer: attention is traced as `softmax(QKᵀ / √d + mask)` with the classic
additive mask `(1 − mask) · −10000` (transformers 5's eager attention multiplies by the scale, which the
optimizer then mistakes for the mask's Mul), and mean pooling is a multiply-and-sum (as a batched matrix
product it becomes a fourth MatMul on the layer's output, which stops attention fusion; after fusion it is
rewritten as that product, `pool_by_product`). Each off-ramp rides
in its layer's graph: a separate call would pay ONNX Runtime's per-call cost and start on a cold cache
(`benchmarks/onnx_step_profile.py` measures both).

`int8` quantizes the encoder layers' feed-forward products dynamically (weights int8 per output channel,
activations quantized per call); attention, embeddings and off-ramps stay fp32 so that the exit decisions see
fp32 logits. Of the ways tried (`benchmarks/int8_tries.py`, SST-2 dev), that one lost the least accuracy: full
depth −0.11 point against −1.49 for every MatMul per-tensor, and as little as static QDQ calibration.
Dynamic activation scales are computed per call over the whole batch, so an int8 answer can depend on the
other rows of its batch. A manifest records the opset, versions, fusions, quantization and the parity
measured against the PyTorch model.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model.modeling import DeeBert

logger = logging.getLogger("deebert.onnx")

OPSET = 17
# Bump when the graphs this module writes change in a way an old cache must not be reused for.
GRAPH_FORMAT = 7
# Dynamic int8's rule for which products it quantizes, recorded in the manifest: 2 finds the feed-forward pair by
# module name too (2a5968c). Rule 1 found it by its Gelu node only, and on graphs without one (DeBERTa, ModernBERT)
# quantized every product; a cache without this record is exported again. (Not in GRAPH_FORMAT: that would also
# void the int8 ranges stored in checkpoints, which do not depend on it.)
INT8_SELECTION = 2
MANIFEST_NAME = "manifest.json"
# int8: dynamic (ONNX Runtime's fused graphs); int8-static: QDQ from the checkpoint's stored ranges (`model.int8`).
PRECISIONS = ("fp32", "int8", "int8-static")
# Which runtime the step graphs are written for: ONNX Runtime's (fused with its `com.microsoft` operators) or
# standard ONNX that any reader takes (OpenVINO, which fuses on its own when it compiles).
RUNTIMES = ("onnxruntime", "openvino")
EXPORT_ATTENTION = "deebert_onnx_export"
# Mean pooling's per-token weights, [batch, tokens, 1]: mask / (number of real tokens) (see `pool_weights`).
POOL_WEIGHTS = "pool_weights"


class ExportError(RuntimeError):
    """The model could not be exported (or a graph directory is not a usable export)."""


@dataclass(frozen=True)
class Quantization:
    """How `int8` quantizes the encoder layers (the off-ramps and embeddings always stay fp32).

    `ops`: which matrix products — `ffn` (the two feed-forward products, the default) or `all` (attention
    projections too); `per_channel`: one weight scale per output channel (default) instead of per tensor.
    """

    ops: str = "ffn"
    per_channel: bool = True

    def describe(self) -> str:
        return f"dynamic QInt8, {self.ops} MatMuls, {'per-channel' if self.per_channel else 'per-tensor'} weights"


@dataclass
class Manifest:
    """What an export directory holds and how it was made (manifest.json)."""

    format: int
    precision: str
    opset: int
    runtime: str  # onnxruntime (fused graphs) or openvino (standard ONNX)
    runtime_version: str
    onnx_version: str
    torch_version: str
    checkpoint_digest: str
    num_layers: int
    num_labels: int
    pooling: str
    # What the layer graphs take as their mask: `attention_mask`, or fused attention's per-row token count
    # (int32 [batch], the number of real tokens of each right-padded row).
    layer_mask_input: str = "attention_mask"
    # How many off-ramps pool the mean by one matrix product (`pool_by_product`, fused graphs only: `is_fused`);
    # None in fused graphs: an export from before that rewrite, made again (not in GRAPH_FORMAT, which would also
    # void the int8 ranges stored in checkpoints).
    pool_products: int | None = None
    # How many layer graphs run their position-wise work on packed tokens (`pack_tokens`, fused graphs only); None
    # in fused graphs: an export from before that rewrite, made again (not in GRAPH_FORMAT, as above).
    packed_layers: int | None = None
    files: dict[str, str] = field(default_factory=dict)  # graph file → sha256
    fusions: dict[str, int] = field(default_factory=dict)
    quantization: dict[str, Any] | None = None
    parity: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @staticmethod
    def read(directory: Path) -> Manifest:
        path = directory / MANIFEST_NAME
        try:
            data = json.loads(path.read_text())
            return Manifest(**data)
        except FileNotFoundError:
            raise ExportError(f"{directory} has no {MANIFEST_NAME}") from None
        except (json.JSONDecodeError, TypeError) as err:
            raise ExportError(f"{path} is not a DeeBERT export manifest: {err}") from err

    def write(self, directory: Path) -> None:
        """Write manifest.json whole or not at all (a reader never sees half of it)."""
        staging = directory / f".{MANIFEST_NAME}.tmp"
        staging.write_text(json.dumps(asdict(self), indent=2) + "\n")
        os.replace(staging, directory / MANIFEST_NAME)


def layer_file(layer_number: int) -> str:
    return f"layer_{layer_number}.onnx"


def packed_layer_file(layer_number: int) -> str:
    """The same layer running its position-wise work on packed tokens (`pack_tokens`), beside `layer_file`."""
    return f"layer_{layer_number}.packed.onnx"


PLAIN_FILE = "plain.onnx"
# The exit loop of a batch of one row in one graph (`write_exit_graph`).
EXIT_FILE = "exit.onnx"
EXIT_WEIGHTS_FILE = "exit.onnx.data"  # its weights, beside it (see `write_exit_graph`)
EXIT_THRESHOLD_INPUT = "exit_threshold"
EXIT_OUTPUTS = ("exit_logits", "exit_layer")


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_digest(model: DeeBert) -> str:
    """A digest of what the graphs depend on: every weight and the architecture (not labels or presets)."""
    digest = hashlib.sha256()
    config = model.config
    shape: list[Any] = [config.backbone, config.pooling, config.num_labels]
    if config.final_pooling is not None or config.final_activation != "tanh":  # a converted classifier's head
        shape += [config.final_pooling, config.final_activation]
    if config.final_norm_eps is not None:
        shape += [config.final_norm_eps, config.final_norm_bias]
    digest.update(json.dumps(shape, sort_keys=True).encode())
    for name, value in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().to(torch.float32).cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _export_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Eager attention in the form ONNX Runtime's optimizer fuses: softmax(QKᵀ / √d + mask) V."""
    scores = torch.matmul(query, key.transpose(2, 3)) / math.sqrt(query.size(-1))
    if attention_mask is not None:
        scores = scores + attention_mask
    probabilities = torch.softmax(scores, dim=-1)
    return torch.matmul(probabilities, value).transpose(1, 2).contiguous(), None


class _Traced(nn.Module):
    """The whole DeeBERT model with every hidden state and every off-ramp's logits as outputs."""

    def __init__(self, model: DeeBert) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        model = self.model
        hidden = model.embed(input_ids, token_type_ids, attention_mask)
        additive_mask = (1.0 - attention_mask.unsqueeze(1).unsqueeze(2).to(hidden.dtype)) * -10000.0
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        weights = weights / weights.sum(dim=1, keepdim=True).clamp(min=1.0)
        hidden_states, logits = [hidden], []
        for number, ramp in enumerate(model.off_ramps, start=1):
            if model.own_layer_calls:
                # DeBERTa and ModernBERT: each layer's graph builds its own masks and positions from its input
                # (a step graph starts from the previous layer's output, not from the embeddings).
                inputs = model.layer_inputs(hidden, attention_mask, additive=True)
                hidden = model.run_layer(number, hidden, inputs)
            else:
                hidden = model.layers[number - 1](hidden, additive_mask)
            pooled = hidden[:, 0] if ramp.pooling == "first" else (hidden * weights).sum(dim=1)
            features = ramp._act(ramp.dense(pooled))  # type: ignore[operator]
            if ramp.norm is not None:
                features = ramp.norm(features)  # type: ignore[operator]
            hidden_states.append(hidden)
            logits.append(ramp.classifier(features))  # type: ignore[operator]
        # Mean pooling's weights as an output of their own: the step graphs take them as an input, computed
        # once per batch by the loop (`pool_weights`) instead of five small operators in every layer's call.
        pooling = (weights,) if model.config.uses_mean_pooling else ()
        return (*hidden_states, *logits, *pooling)


def trace_whole(model: DeeBert, path: Path) -> None:
    """The whole model traced to ONNX: every hidden state and every off-ramp's logits as outputs."""
    from transformers import AttentionInterface

    AttentionInterface.register(EXPORT_ATTENTION, _export_attention)
    traced_model = copy.deepcopy(model).to(torch.float32).cpu().eval()
    traced_model.backbone.config._attn_implementation = EXPORT_ATTENTION
    n = model.num_layers
    hidden_names = [f"hidden_{i}" for i in range(n + 1)]
    logit_names = [f"logits_{i}" for i in range(1, n + 1)]
    pool_names = [POOL_WEIGHTS] if model.config.uses_mean_pooling else []
    input_names = ["input_ids", "attention_mask", "token_type_ids"]
    dynamic_axes: dict[str, dict[int, str]] = {name: {0: "batch", 1: "sequence"} for name in input_names}
    dynamic_axes |= {name: {0: "batch", 1: "sequence"} for name in pool_names}
    dynamic_axes |= {name: {0: "batch", 1: "sequence"} for name in hidden_names}
    dynamic_axes |= {name: {0: "batch"} for name in logit_names}
    input_ids = torch.full((2, 7), 5, dtype=torch.long)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 4:] = 0
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python values in shapes; the axes are dynamic
        torch.onnx.export(
            _Traced(traced_model),
            (input_ids, attention_mask, torch.zeros_like(input_ids)),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=input_names,
            output_names=hidden_names + logit_names + pool_names,
            dynamic_axes=dynamic_axes,
        )


def _optimize(model: DeeBert, source: Path, target: Path) -> dict[str, int]:
    """ONNX Runtime's transformer fusions; the counts of fused operators."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    # EmbedLayerNormalization would hand the layers a mask index computed inside the embeddings graph;
    # the layers take the attention mask itself, so that compaction only has to slice it.
    options.enable_embed_layer_norm = False
    if model.rotary_positions:
        # ModernBERT normalises before each layer (pre-LN): fusing a layer's residual sum into the next layer's
        # LayerNorm would put both layers' work in one node, and the step graphs are cut between them.
        options.enable_skip_layer_norm = False
    optimized = optimize_model(
        str(source),
        model_type="bert",
        num_heads=int(model.config.backbone_value("num_attention_heads")),
        hidden_size=model.config.hidden_size,
        opt_level=0,
        optimization_options=options,
    )
    fusions = {op: count for op, count in optimized.get_fused_operator_statistics().items() if count}
    optimized.save_model_to_file(str(target))
    if fusions.get("Attention", 0) != model.num_layers:
        logger.warning(
            "ONNX Runtime fused attention in %d of %d layers; the rest run unfused (slower, same answers)",
            fusions.get("Attention", 0),
            model.num_layers,
        )
    return fusions


def is_fused(runtime: str, precision: str) -> bool:
    """Whether the graphs are ONNX Runtime's fused ones (its `com.microsoft` operators, mean pooling as one
    product): fp32 and dynamic int8 on ONNX Runtime. OpenVINO's are cut as traced, and static int8 is one standard
    QDQ graph for both runtimes, cut unfused like OpenVINO's."""
    return runtime == "onnxruntime" and precision != "int8-static"


def _consumers(graph: Any) -> dict[str, list[Any]]:
    """Each tensor name of `graph` → the nodes that read it."""
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return consumers


def pool_by_product(graph: Any) -> int:
    """Mean pooling's multiply-and-sum (`hidden * pool_weights`, summed over tokens) rewritten in place as one
    batched matrix product, `pool_weights` laid out [batch, 1, tokens] (a reshape, no copy) times the hidden
    states; how many off-ramps it rewrote.

    The trace keeps the multiply-and-sum because a fourth MatMul on a layer's output stops ONNX Runtime's
    attention fusion (see the module's docstring); rewritten after fusion, each off-ramp writes no [batch,
    tokens, hidden] product and reads the hidden states once. Measured on the shipped model at batch 1: about
    11 µs less per off-ramp, 1.5 % of the exit graph's time at `balanced` on SST-2 dev (BENCHMARKS.md §17); in
    batches, no difference."""
    import numpy as np
    from onnx import helper, numpy_helper

    consumers = _consumers(graph)
    constants = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    row_weights, flat_shape = f"{POOL_WEIGHTS}_row", f"{POOL_WEIGHTS}_flat_shape"
    replaced: dict[int, list[Any]] = {}  # the Mul's position → the nodes that take its and its sum's place
    dropped: set[int] = set()
    for position, node in enumerate(graph.node):
        if node.op_type != "Mul" or POOL_WEIGHTS not in node.input or len(consumers.get(node.output[0], [])) != 1:
            continue
        total = consumers[node.output[0]][0]
        keepdims = next((a.i for a in total.attribute if a.name == "keepdims"), 1)
        axes = constants.get(total.input[1]) if len(total.input) > 1 else None
        if total.op_type != "ReduceSum" or keepdims != 0 or axes is None or axes.tolist() != [1]:
            continue
        hidden = next(name for name in node.input if name != POOL_WEIGHTS)
        product = f"{total.output[0]}_product"
        replaced[position] = [
            helper.make_node("MatMul", [row_weights, hidden], [product], name=f"{node.name}_pool_product"),
            helper.make_node("Reshape", [product, flat_shape], [total.output[0]], name=f"{total.name}_pool_flat"),
        ]
        dropped.add(id(total))
    if not replaced:
        return 0
    nodes = [helper.make_node("Reshape", [POOL_WEIGHTS, f"{POOL_WEIGHTS}_row_shape"], [row_weights], name="pool_row")]
    for position, node in enumerate(graph.node):
        if id(node) not in dropped:
            nodes += replaced.get(position, [node])
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([0, 1, -1], np.int64), f"{POOL_WEIGHTS}_row_shape"),
            numpy_helper.from_array(np.array([0, -1], np.int64), flat_shape),
        ]
    )
    del graph.node[:]
    graph.node.extend(nodes)
    return len(replaced)


# The inputs of a layer graph whose position-wise work runs on packed tokens (`pack_tokens`): for each real token
# of the right-padded batch, its position in the padded [rows × tokens] layout (int64 [real tokens]); and for each
# padded position, the real token it reads (int64 [rows × tokens]; a padding position reads its row's first).
UNPAD_INDEX = "unpad_index"
PAD_INDEX = "pad_index"
# Operators that work token by token (or, dynamic quantization, over the whole tensor), found between a layer's
# attention and its output in ONNX Runtime's fused graphs: what may run on packed tokens.
_TOKENWISE_OPS = {
    "Add", "BiasGelu", "FastGelu", "Gelu", "Mul", "Relu", "Tanh", "Cast", "MatMul", "MatMulInteger",
    "DynamicQuantizeLinear", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "SkipLayerNormalization",
    "LayerNormalization", "SkipSimplifiedLayerNormalization", "QuantizeLinear", "DequantizeLinear",
}  # fmt: skip


def pack_tokens(graph: Any) -> bool:
    """Rewrite one fused layer graph in place so that its position-wise work runs on the batch's real tokens only,
    not on its padding; whether it could (False leaves the graph as it was).

    The layer's input stays right-padded, [rows, tokens, hidden], as does its output: the graph gathers the real
    tokens ([real tokens, hidden], `UNPAD_INDEX`), computes the query/key/value product and everything after
    attention (output product, feed-forward, layer norms) on them, and only for attention itself lays the
    products out padded again (`PAD_INDEX`) for ONNX Runtime's MultiHeadAttention, which masks by each row's token
    count as the fused Attention did. The layer's output is padded back the same way, so the off-ramp, the next
    layer and the loop's compaction see the layout they always did. In batches of texts in arrival order the
    padding is most of the work it saves: SST-2 dev in batches of 32 carries 1.95 padded positions per real
    token, 1.25 split by length (BENCHMARKS.md §22). Where there is little padding the fused Attention is faster
    (no gathers), so the loop picks the form per call (`model.onnx_backend.PACK_ABOVE_PADDING`).

    The graph must be one layer as ONNX Runtime fuses it: one Attention (its weights and bias initializers, the
    token-count mask), two SkipLayerNormalizations (after attention, after the feed-forward), and only token-wise
    operators between them."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    attentions = [n for n in graph.node if n.op_type == "Attention" and n.domain == "com.microsoft"]
    if len(attentions) != 1:
        return False
    attention = attentions[0]
    attributes = {a.name: a for a in attention.attribute}
    if len(attention.input) != 4 or not attention.input[3] or set(attributes) - {"num_heads", "scale"}:
        return False
    padded, weight, bias, mask = attention.input
    initializers = {i.name: i for i in graph.initializer}
    if weight not in initializers or bias not in initializers:
        return False
    width = int(initializers[weight].dims[0])
    if list(initializers[weight].dims) != [width, 3 * width]:
        return False
    consumers = _consumers(graph)
    norms = [n for n in graph.node if n.op_type == "SkipLayerNormalization"]
    first = [n for n in norms if padded in n.input[:2]]
    if len(norms) != 2 or len(first) != 1 or first[0].output[0] not in norms[1].input[:2]:
        return False
    if {id(n) for n in consumers[padded]} != {id(attention), id(first[0])}:
        return False
    last = norms[1]
    # Every operator on the way from attention's output to the layer's output must work token by token.
    between: list[Any] = []
    frontier = [attention.output[0]]
    seen: set[int] = set()
    while frontier:
        name = frontier.pop()
        for node in consumers.get(name, []):
            if id(node) in seen or node is last:
                continue
            seen.add(id(node))
            between.append(node)
            frontier.extend(node.output)
    if any(node.op_type not in _TOKENWISE_OPS for node in between) or not between:
        return False

    def tensor(suffix: str) -> str:
        return f"{padded}_{suffix}"

    packed_input, layer_output = tensor("packed"), last.output[0]
    qkv_shape = tensor("qkv_shape")
    nodes_before = [
        helper.make_node("Shape", [padded], [tensor("shape")], name=tensor("shape_node")),
        helper.make_node("Shape", [padded], [tensor("rows_tokens")], name=tensor("rows_tokens_node"), end=2),
        helper.make_node("Concat", [tensor("rows_tokens"), tensor("qkv_width")], [qkv_shape], axis=0),
        helper.make_node("Reshape", [padded, tensor("flat_shape")], [tensor("flat")]),
        helper.make_node("Gather", [tensor("flat"), UNPAD_INDEX], [packed_input], axis=0),
    ]
    heads = attributes["num_heads"].i
    extra = {"scale": attributes["scale"].f} if "scale" in attributes else {}
    attention_nodes = [
        helper.make_node("MatMul", [packed_input, weight], [tensor("qkv_product")]),
        helper.make_node("Add", [tensor("qkv_product"), bias], [tensor("qkv")]),
        helper.make_node("Gather", [tensor("qkv"), PAD_INDEX], [tensor("qkv_padded_flat")], axis=0),
        helper.make_node("Reshape", [tensor("qkv_padded_flat"), qkv_shape], [tensor("qkv_padded")]),
        helper.make_node(
            "Split", [tensor("qkv_padded"), tensor("qkv_sizes")], [tensor("q"), tensor("k"), tensor("v")], axis=2
        ),
        helper.make_node(
            "MultiHeadAttention",
            [tensor("q"), tensor("k"), tensor("v"), "", mask],
            [tensor("context")],
            domain="com.microsoft",
            num_heads=heads,
            **extra,
        ),
        helper.make_node("Reshape", [tensor("context"), tensor("flat_shape")], [tensor("context_flat")]),
        helper.make_node("Gather", [tensor("context_flat"), UNPAD_INDEX], [attention.output[0]], axis=0),
    ]
    last.output[0] = tensor("output_packed")
    nodes_after = [
        helper.make_node("Gather", [tensor("output_packed"), PAD_INDEX], [tensor("output_flat")], axis=0),
        helper.make_node("Reshape", [tensor("output_flat"), tensor("shape")], [layer_output]),
    ]
    first[0].input[list(first[0].input[:2]).index(padded)] = packed_input
    nodes: list[Any] = []
    for node in graph.node:
        if node is attention:
            nodes += nodes_before + attention_nodes
            continue
        nodes.append(node)
        if node is last:
            nodes += nodes_after
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([-1, width], np.int64), tensor("flat_shape")),
            numpy_helper.from_array(np.array([3 * width], np.int64), tensor("qkv_width")),
            numpy_helper.from_array(np.array([width] * 3, np.int64), tensor("qkv_sizes")),
        ]
    )
    graph.input.extend(
        [
            helper.make_tensor_value_info(UNPAD_INDEX, TensorProto.INT64, ["real_tokens"]),
            helper.make_tensor_value_info(PAD_INDEX, TensorProto.INT64, ["padded_tokens"]),
        ]
    )
    del graph.value_info[:]  # shapes recorded for the padded layout; the runtime infers them again
    return True


def _pack_layers(directory: Path, num_layers: int) -> int:
    """Beside each layer graph of an export, its packed form (`pack_tokens`, `packed_layer_file`) where it can be
    rewritten; how many were. The padded ones stay: a call with little padding runs faster on them (fused
    attention, no gathers), and the exit graph (a lone row, no padding) nests them."""
    import onnx

    packed = 0
    for number in range(1, num_layers + 1):
        model = onnx.load(str(directory / layer_file(number)))
        if pack_tokens(model.graph):
            onnx.checker.check_model(model)
            onnx.save(model, str(directory / packed_layer_file(number)))
            packed += 1
    return packed


def _split(whole: Path, directory: Path, num_layers: int, rewrite_pooling: bool) -> tuple[str, int]:
    """Cut the whole graph into the step graphs; the name of the mask input the layer graphs take, and how many
    off-ramps pool by one matrix product (`pool_by_product`, when `rewrite_pooling`)."""
    import onnx
    from onnx.utils import Extractor

    model = onnx.load(str(whole))
    products = pool_by_product(model.graph) if rewrite_pooling else 0
    # Fused attention reads a per-row token count (int32 [batch]) computed from the attention mask; the
    # layers take that count as their input, so they do not each recompute it.
    mask_inputs = {node.input[3] for node in model.graph.node if node.op_type == "Attention" and len(node.input) > 3}
    layer_mask = "attention_mask"
    if len(mask_inputs) == 1:
        layer_mask = mask_inputs.pop()
        if all(info.name != layer_mask for info in model.graph.value_info):
            model.graph.value_info.append(
                onnx.helper.make_tensor_value_info(layer_mask, onnx.TensorProto.INT32, ["batch"])
            )
    extractor = Extractor(model)
    # A graph input the trace dropped (token types, for encoders without them: DistilBERT) is left out.
    graph_inputs = {i.name for i in model.graph.input}

    def cut(inputs: list[str], outputs: list[str], name: str) -> None:
        kept = [i for i in inputs if i in graph_inputs or not i.startswith(("input_ids", "token_type_ids"))]
        onnx.save(extractor.extract_model(kept, outputs), str(directory / name))

    # The off-ramps pool with the mean-pooling weights (or, pooling the first token, need no mask).
    pooling = [POOL_WEIGHTS] if any(o.name == POOL_WEIGHTS for o in model.graph.output) else []
    masks = [layer_mask, *pooling]
    for i in range(1, num_layers + 1):
        # Layer 1 starts from the token ids (the embeddings in the same call); every layer ends in its
        # off-ramp (layer n in the final classifier).
        inputs = ["input_ids", "token_type_ids"] if i == 1 else [f"hidden_{i - 1}"]
        outputs = [f"logits_{i}"] if i == num_layers else [f"hidden_{i}", f"logits_{i}"]
        cut([*inputs, *masks], outputs, layer_file(i))
    cut(["input_ids", "attention_mask", "token_type_ids"], [f"logits_{num_layers}"], PLAIN_FILE)
    return layer_mask, products


def write_exit_graph(directory: Path, num_layers: int) -> None:
    """`EXIT_FILE`: the step graphs of `directory` nested in `If` nodes, so that a batch of one row runs the whole
    exit loop in one call. After layer i's graph (and its off-ramp) comes DeeBERT's rule in graph form
    (`EntropyCriterion.graph_leaves`) on off-ramp i's logits against the input `exit_threshold`; if the row
    leaves, the graph returns those logits and i (`exit_logits`, `exit_layer`), otherwise its else-branch runs
    layer i+1, and so on to layer n, which always returns.

    At batch 1 each step graph's run costs beyond its kernels (the call, a run's setup, handing the hidden states
    back through Python): at `balanced` on SST-2 the nested graph took 0.93-0.94x the step-by-step loop's time on
    ONNX Runtime and 0.85-0.90x on OpenVINO (BENCHMARKS.md §16). Each branch holds its own layer's weights:
    weights held by the outer graph would be handed down as implicit inputs through every level, which measured
    slower than the loop."""
    import onnx
    from onnx import TensorProto, helper

    from model.exit_rule import EntropyCriterion

    rule = EntropyCriterion()
    layers = [onnx.load(str(directory / layer_file(i))) for i in range(1, num_layers + 1)]
    for number, layer in enumerate(layers, 1):
        # The graphs were cut from one whole, but constants they share appear in several: names made unique
        # per layer, except what the layers hand each other (hidden states, logits) and the graph inputs.
        graph = layer.graph
        shared = {value.name for value in graph.output} | {value.name for value in graph.input}
        renamed: dict[str, str] = {}
        for tensor in graph.initializer:
            renamed[tensor.name] = tensor.name = f"layer{number}/{tensor.name}"
        for node in graph.node:
            for position, name in enumerate(node.output):
                if name and name not in shared:
                    renamed[name] = node.output[position] = f"layer{number}/{name}"
        for node in graph.node:
            for position, name in enumerate(node.input):
                node.input[position] = renamed.get(name, name)

    def output(name: str, element: int) -> Any:
        return helper.make_tensor_value_info(name, element, None)

    def layer_constant(name: str, number: int) -> Any:
        value = helper.make_tensor(name, TensorProto.INT64, [1], [number])
        return helper.make_node("Constant", [], [name], value=value)

    def from_layer(number: int) -> tuple[list[Any], str, str]:
        """Nodes running layers `number`..n (the caller holds layer `number`'s weights) and the names of
        their logits and exit layer."""
        nodes = list(layers[number - 1].graph.node)
        logits = f"logits_{number}"
        if number == num_layers:
            nodes.append(layer_constant(f"exit_layer_{number}", number))
            return nodes, logits, f"exit_layer_{number}"
        leaves = f"leaves_{number}"
        nodes += rule.graph_leaves(logits, "negated_threshold", leaves, prefix=f"rule{number}/")
        left = [
            helper.make_node("Identity", [logits], [f"left_logits_{number}"]),
            layer_constant(f"left_{number}", number),
        ]
        leave = helper.make_graph(
            left,
            f"leave_after_{number}",
            [],
            [output(f"left_logits_{number}", TensorProto.FLOAT), output(f"left_{number}", TensorProto.INT64)],
        )
        inner, inner_logits, inner_layer = from_layer(number + 1)
        inner += [
            helper.make_node("Identity", [inner_logits], [f"later_logits_{number}"]),
            helper.make_node("Identity", [inner_layer], [f"later_{number}"]),
        ]
        go_on = helper.make_graph(
            inner,
            f"go_on_after_{number}",
            [],
            [output(f"later_logits_{number}", TensorProto.FLOAT), output(f"later_{number}", TensorProto.INT64)],
            initializer=list(layers[number].graph.initializer),
        )
        results = [f"logits_from_{number}", f"exit_layer_from_{number}"]
        nodes.append(helper.make_node("If", [leaves], results, then_branch=leave, else_branch=go_on))
        return nodes, results[0], results[1]

    first = layers[0]
    nodes = [helper.make_node("Neg", [EXIT_THRESHOLD_INPUT], ["negated_threshold"])]
    body, logits, exit_layer = from_layer(1)
    nodes += body
    nodes += [
        helper.make_node("Identity", [logits], [EXIT_OUTPUTS[0]]),
        helper.make_node("Identity", [exit_layer], [EXIT_OUTPUTS[1]]),
    ]
    threshold = helper.make_tensor_value_info(EXIT_THRESHOLD_INPUT, TensorProto.FLOAT, [])
    graph = helper.make_graph(
        nodes,
        "deebert_exit_loop",
        [*first.graph.input, threshold],
        [output(EXIT_OUTPUTS[0], TensorProto.FLOAT), output(EXIT_OUTPUTS[1], TensorProto.INT64)],
        initializer=list(first.graph.initializer),
    )
    composed = helper.make_model(graph, opset_imports=list(first.opset_import))
    composed.ir_version = first.ir_version
    # The weights in a file of their own, which ONNX Runtime maps into memory: for the shipped model (90 MB of
    # weights) the session alone added 314 MiB to the process when they were inside the graph's file, 87 MiB
    # this way, at the same speed (measured by hand, BENCHMARKS.md §16).
    onnx.save(
        composed,
        str(directory / EXIT_FILE),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=EXIT_WEIGHTS_FILE,
        size_threshold=1024,
    )


def export_plain_unfused(model: DeeBert, path: Path) -> None:
    """The plain full forward (token ids → the final classifier's logits) as a standard ONNX graph without
    ONNX Runtime's fused operators: what runtimes that read ONNX but not `com.microsoft` ops (OpenVINO) load."""
    import onnx
    from onnx.utils import Extractor

    with tempfile.TemporaryDirectory() as scratch:
        whole = Path(scratch) / "whole.onnx"
        trace_whole(model, whole)
        graph = onnx.load(str(whole))
        names = {i.name for i in graph.graph.input}
        inputs = [i for i in ("input_ids", "attention_mask", "token_type_ids") if i in names]
        plain = Extractor(graph).extract_model(inputs, [f"logits_{model.num_layers}"])
    onnx.save(plain, str(path))


def _ffn_matmuls(path: Path) -> list[str]:
    """The feed-forward MatMuls of a layer graph (`int8.weight_matmuls`: found by module name, fused or not)."""
    import onnx

    from model.int8 import weight_matmuls

    chosen = [node.name for node in weight_matmuls(onnx.load(str(path)).graph, "ffn")]
    if not chosen:  # an empty list would make the quantizer take every MatMul
        raise ExportError(f"no feed-forward products found in {path.name} to quantize")
    return chosen


def _quantize(directory: Path, num_layers: int, settings: Quantization) -> None:
    """Dynamic int8 for every layer graph, and the plain graph the same way (the loop's full-depth path and the
    peer benchmark's plain int8 model), so a full-depth answer is the same whichever path computes it.
    Off-ramps (Gemm) and embeddings stay fp32."""
    import onnx

    extra = {"DefaultTensorType": onnx.TensorProto.FLOAT}
    targets = [directory / layer_file(i) for i in range(1, num_layers + 1)]
    with _quiet_root_logger():  # the quantizer logs every tensor on the root logger (a page per layer)
        _quantize_each([*targets, directory / PLAIN_FILE], settings, extra)


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _quantize_each(paths: list[Path], settings: Quantization, extra: dict[str, Any]) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    for path in paths:
        nodes = _ffn_matmuls(path) if settings.ops == "ffn" else None
        quantize_dynamic(
            path,
            path,
            op_types_to_quantize=["MatMul", "Attention"],
            per_channel=settings.per_channel,
            weight_type=QuantType.QInt8,
            nodes_to_quantize=nodes,
            extra_options=extra,
        )


def export_graphs(
    model: DeeBert,
    directory: Path,
    precision: str = "fp32",
    quantization: Quantization | None = None,
    digest: str | None = None,
    runtime: str = "onnxruntime",
) -> Manifest:
    """Write the step graphs of `model` into `directory` (replaced whole, atomically) with a manifest.

    For `onnxruntime` the traced model is fused by ONNX Runtime's optimizer before it is cut; for `openvino` it
    is cut as traced (standard ONNX operators; OpenVINO fuses when it compiles), and the layers take the
    attention mask itself."""
    import onnx

    if precision not in PRECISIONS:
        raise ExportError(f"unknown precision {precision!r}: use {', '.join(PRECISIONS)}")
    if runtime not in RUNTIMES:
        raise ExportError(f"unknown runtime {runtime!r}: use {', '.join(RUNTIMES)}")
    if runtime == "openvino" and precision == "int8":
        raise ExportError("OpenVINO takes static int8 (int8-static), not ONNX Runtime's dynamic int8")
    fused = is_fused(runtime, precision)
    started = time.perf_counter()
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        with tempfile.TemporaryDirectory() as scratch:
            whole = Path(scratch) / "whole.onnx"
            optimized = Path(scratch) / "fused.onnx"
            trace_whole(model, whole)
            if fused:
                fusions = _optimize(model, whole, optimized)
                layer_mask, pool_products = _split(optimized, staging, model.num_layers, rewrite_pooling=True)
            else:
                fusions, pool_products = {}, None
                layer_mask, _ = _split(whole, staging, model.num_layers, rewrite_pooling=False)
        settings = None
        quantized: dict[str, Any] | None = None
        if precision == "int8":
            settings = quantization or Quantization()
            _quantize(staging, model.num_layers, settings)
            quantized = {**asdict(settings), "method": settings.describe(), "selection": INT8_SELECTION}
        elif precision == "int8-static":
            quantized = _quantize_static(model, staging)
        write_exit_graph(staging, model.num_layers)
        # Dynamic int8 stays padded: its activation scale is taken over the whole tensor, so packing would move
        # its answers away from the plain int8 graph's (which full depth runs).
        packed_layers = (_pack_layers(staging, model.num_layers) if precision == "fp32" else 0) if fused else None
        manifest = Manifest(
            format=GRAPH_FORMAT,
            precision=precision,
            opset=OPSET,
            runtime=runtime,
            runtime_version=runtime_version(runtime),
            onnx_version=onnx.__version__,
            torch_version=torch.__version__,
            checkpoint_digest=digest or model_digest(model),
            num_layers=model.num_layers,
            num_labels=model.config.num_labels,
            pooling=model.config.pooling,
            layer_mask_input=layer_mask,
            pool_products=pool_products,
            packed_layers=packed_layers,
            fusions=fusions,
            quantization=quantized,
        )
        graphs = [*staging.glob("*.onnx"), *staging.glob("*.onnx.data")]
        manifest.files = {path.name: file_digest(path) for path in sorted(graphs)}
        manifest.seconds = round(time.perf_counter() - started, 2)
        manifest.write(staging)
        if directory.exists():
            shutil.rmtree(directory)
        staging.rename(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("exported %s graphs to %s in %.1f s (fusions %s)", precision, directory, manifest.seconds, fusions)
    return manifest


def _quantize_static(model: DeeBert, directory: Path) -> dict[str, Any]:
    """QDQ int8 in every step graph from the checkpoint's stored activation ranges (`model.int8`)."""
    from model.int8 import QuantizationError, check_ranges, quantize_graph, ranges_digest

    try:
        ranges, ops = check_ranges(model.config.int8_ranges)
        counts = [
            quantize_graph(directory / name, ranges, ops)
            for name in [*(layer_file(i) for i in range(1, model.num_layers + 1)), PLAIN_FILE]
        ]
    except QuantizationError as err:
        raise ExportError(str(err)) from err
    return {
        "method": f"static QDQ: {ops} weight products int8 per channel, activations uint8 from stored ranges",
        "ranges_digest": ranges_digest(model.config.int8_ranges),
        "texts": model.config.int8_ranges.get("texts"),
        "quantized_products": counts,
    }


def runtime_version(runtime: str) -> str:
    """The installed version of `runtime` (what its graph cache is keyed by)."""
    if runtime == "openvino":
        import openvino

        return str(openvino.__version__)
    import onnxruntime

    return str(onnxruntime.__version__)


def parity_batch(model: DeeBert, batch_size: int = 4, length: int = 19, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random token ids of varied lengths, right-padded: inputs to compare backends on."""
    generator = torch.Generator().manual_seed(seed)
    vocab = int(model.config.backbone["vocab_size"])
    input_ids = torch.randint(5, vocab, (batch_size, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    for row in range(batch_size):
        attention_mask[row, max(2, length - 4 * row) :] = 0
    input_ids = input_ids.masked_fill(attention_mask == 0, int(model.config.backbone.get("pad_token_id") or 0))
    return input_ids, attention_mask, torch.zeros_like(input_ids)
