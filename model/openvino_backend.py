"""The OpenVINO backend: the exit loop of `model.early_exit` over OpenVINO-compiled step graphs (CPU).

The step graphs are the same cut as ONNX Runtime's (one call per layer with its off-ramp; the embeddings in
layer 1's call; a plain full-depth graph), exported as standard ONNX (`onnx_export.export_graphs(runtime=
"openvino")`): ONNX Runtime's fused `com.microsoft` operators are its own, and OpenVINO fuses attention and
layer norms itself when it compiles. Everything between the calls (exit rule, compaction, the batch-1 inputs)
is `StepGraphModel`'s, shared with ONNX Runtime.

Precision is OpenVINO's inference precision, chosen at compile time: `bf16` on CPUs whose OpenVINO reports the
BF16 capability (AVX-512 BF16, AMX), `fp32` everywhere. In bf16 the layer graphs take and return their hidden
states as bfloat16 (`HIDDEN_PREFIX` ports), passed from one call to the next as their raw 16-bit payload (numpy
has no bfloat16; compaction cuts rows and padding from it as from any array): as in one bf16 graph, with no
conversion to f32 and back at every edge (those reorders were 1.09-1.12x of a batch-32 `balanced` pass on an Intel
Xeon with AMX, 1.05x on an AMD EPYC: BENCHMARKS.md §10, §13). The graphs are cached; OpenVINO's compiled blobs are
not (its CACHE_DIR maps blob files that another process sharing the cache may be rewriting: a server started
beside another one died with SIGBUS), and compiling the graphs takes about a second.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from model.config import DeeBertConfig
from model.onnx_backend import POOL_WEIGHTS, StepGraph, StepGraphModel, load_cached_graphs
from model.onnx_export import ExportError, Manifest

logger = logging.getLogger("deebert.openvino")

# Our precision names → OpenVINO's INFERENCE_PRECISION_HINT.
INFERENCE_PRECISIONS = {"fp32": "f32", "bf16": "bf16"}
# OpenVINO's CPU plugin prepares kernels per input shape and keeps them in its runtime cache (a compile
# property, default 5,000 entries). The exit loop's seven step graphs meet many (rows, tokens) shapes, a plain
# graph few: at the default the loop's kernels were rebuilt over and over. (oneDNN's own primitive cache is
# left to the environment: `deebert serve` caps it for flat memory, see server/memory.py.)
RUNTIME_CACHE_CAPACITY = 100_000
# The step graphs' hidden-state inputs and outputs (`hidden_0` .. `hidden_n`): bfloat16 at the edges in bf16.
HIDDEN_PREFIX = "hidden_"
# Token counts are padded up to a multiple of this (fewer shapes to prepare kernels for; masked, same answers).
DEFAULT_LENGTH_BUCKET = 8


def length_bucket() -> int:
    """`DEEBERT_OPENVINO_LENGTH_BUCKET` (1 = no padding), default `DEFAULT_LENGTH_BUCKET`."""
    return max(1, int(os.environ.get("DEEBERT_OPENVINO_LENGTH_BUCKET", DEFAULT_LENGTH_BUCKET)))


def preloaded_allocator() -> str | None:
    """The malloc preloaded into this process (jemalloc, tcmalloc), if any."""
    preload = os.environ.get("LD_PRELOAD", "")
    return next((name for name in ("jemalloc", "tcmalloc") if name in preload), None)


# Under a preloaded malloc, OpenVINO's CPU plugin aborted ("free(): invalid size" / "munmap_chunk(): invalid
# pointer", compiling even a one-node graph; jemalloc 5.3, OpenVINO 2026.4). The cause is oneTBB, OpenVINO's
# threading: it opens its topology library (tbbbind, and with it hwloc) with RTLD_DEEPBIND, so hwloc frees with
# glibc's own `free` what glibc's functions allocated through the preloaded malloc (oneTBB issues #1636, #1645).
# `TBB_ENABLE_SANITIZERS=1` makes oneTBB open it without RTLD_DEEPBIND (oneTBB pull request #1065): with it,
# OpenVINO runs under jemalloc. oneTBB reads it when it first looks at the topology (OpenVINO's first compile).
TBB_DEEPBIND_SWITCH = "TBB_ENABLE_SANITIZERS"


def allow_under_preloaded_allocator() -> None:
    """Set `TBB_ENABLE_SANITIZERS=1` in this process when a malloc is preloaded, before OpenVINO's first compile
    (every way into OpenVINO here checks `openvino_unavailable_reason` first). Checked with jemalloc, which
    `deebert serve` preloads; tcmalloc (the other one it can preload) was not installed to check."""
    if preloaded_allocator() is not None:
        os.environ.setdefault(TBB_DEEPBIND_SWITCH, "1")


def openvino_unavailable_reason() -> str | None:
    """Why OpenVINO cannot run in this process (not installed, or a preloaded allocator oneTBB would clash
    with); None when it can."""
    allow_under_preloaded_allocator()
    try:
        import openvino  # noqa: F401
    except ImportError:
        return "openvino is not installed"
    allocator = preloaded_allocator()
    switch = os.environ.get(TBB_DEEPBIND_SWITCH)
    if allocator is not None and switch != "1":
        return (
            f"OpenVINO aborts under the preloaded {allocator} with {TBB_DEEPBIND_SWITCH}={switch} "
            "(oneTBB's RTLD_DEEPBIND; unset it, or set it to 1)"
        )
    return None


def openvino_available() -> bool:
    return openvino_unavailable_reason() is None


def cpu_capabilities() -> list[str]:
    """OpenVINO's optimization capabilities of this CPU (`BF16`, `FP32`, `INT8`, ...); [] without openvino."""
    if not openvino_available():
        return []
    import openvino

    return [str(c) for c in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")]


def supported_precisions() -> list[str]:
    """The inference precisions OpenVINO runs natively on this CPU: `fp32`, and `bf16` where it reports BF16."""
    capabilities = cpu_capabilities()
    if not capabilities:
        return []
    return ["fp32", "bf16"] if "BF16" in capabilities else ["fp32"]


class _OpenVinoGraph:
    """One compiled step graph: an infer request per calling thread (a request is not thread-safe), inputs
    shared without a copy, outputs copied out once (the next call reuses the request's buffers). With
    `bf16_hidden`, its hidden-state ports are bfloat16, fed and returned as uint16 arrays of their payload."""

    def __init__(self, core: Any, graph: Path | Any, properties: dict[str, Any], bf16_hidden: bool = False) -> None:
        """`graph`: the ONNX file, or an `openvino.Model` read from it (and changed before compiling)."""
        import openvino

        self._bf16_inputs: frozenset[str] = frozenset()
        self._bf16_outputs: frozenset[int] = frozenset()
        if bf16_hidden:
            graph = core.read_model(str(graph)) if isinstance(graph, Path) else graph
            graph, self._bf16_inputs, self._bf16_outputs = _bf16_hidden_ports(graph)
        self.compiled = core.compile_model(str(graph) if isinstance(graph, Path) else graph, "CPU", properties)
        self.inputs = [port.get_any_name() for port in self.compiled.inputs]
        outputs = [port.get_any_name() for port in self.compiled.outputs]
        # The hidden states a layer graph returns are read from the request's own buffer (no copy, see `run`);
        # its other outputs (the off-ramp's few logits) are copied, and a graph without hidden-state outputs
        # (the plain graph: its logits are the answer a caller may keep) copies every output.
        self._shared_outputs = frozenset(i for i, name in enumerate(outputs) if name.startswith(HIDDEN_PREFIX))
        self._copied_outputs = [i for i in range(len(outputs)) if i not in self._shared_outputs]
        self.takes_pool_weights = POOL_WEIGHTS in self.inputs
        self.takes_token_types = "token_type_ids" in self.inputs
        self.takes_token_indices = False  # OpenVINO's graphs are cut as traced (`model.onnx_export.pack_tokens`)
        self._local = threading.local()
        self._bf16, self._tensor = openvino.Type.bf16, openvino.Tensor

    def _request(self) -> Any:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        return request

    def __call__(self, **feeds: np.ndarray) -> list[np.ndarray]:
        """Every output, in the graph's order."""
        return self.run({name: feeds[name] for name in self.inputs})

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Every output, from feeds that name exactly the graph's inputs (bfloat16 ports: uint16 payloads).

        A hidden-state output is a view of this thread's request buffer, valid until this graph runs again on
        this thread: the exit loop feeds it to the next layer's graph (or cuts rows from it into a new array)
        before then. Copying it out of every layer's call took 4-9 % of the step graphs' time in batches on an
        Intel Xeon with AMX (BENCHMARKS.md §14); the other outputs are copied (tiny), so that what a caller
        keeps (logits) stays its own."""
        if not self._shared_outputs:
            # `infer` copies every output into an array of its own (share_outputs=False).
            return list(self._request().infer(self.typed(feeds), share_inputs=True).to_tuple())
        outputs = list(self._request().infer(self.typed(feeds), share_inputs=True, share_outputs=True).to_tuple())
        for index in self._copied_outputs:
            outputs[index] = outputs[index].copy()
        return self.payloads(outputs)

    def typed(self, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
        """`feeds` with each bfloat16 input's payload as a tensor typed bfloat16 (shared, not copied)."""
        if not self._bf16_inputs:
            return feeds
        typed: dict[str, Any] = dict(feeds)
        for name in self._bf16_inputs & feeds.keys():
            payload = np.ascontiguousarray(feeds[name])  # kept alive by the tensor while the call runs
            typed[name] = self._tensor(payload, payload.shape, self._bf16)
        return typed

    def payloads(self, outputs: list[np.ndarray]) -> list[np.ndarray]:
        """`outputs` with each bfloat16 one (numpy sees it as float16) as its uint16 payload (a view, no copy)."""
        for index in self._bf16_outputs:
            outputs[index] = outputs[index].view(np.uint16)
        return outputs


def _bf16_hidden_ports(model: Any) -> tuple[Any, frozenset[str], frozenset[int]]:
    """`model` with its hidden-state inputs and outputs made bfloat16 at the edge (OpenVINO's preprocessing), the
    names of those inputs and the positions of those outputs."""
    import openvino
    from openvino.preprocess import PrePostProcessor

    inputs = frozenset(p.get_any_name() for p in model.inputs if p.get_any_name().startswith(HIDDEN_PREFIX))
    outputs = frozenset(i for i, p in enumerate(model.outputs) if p.get_any_name().startswith(HIDDEN_PREFIX))
    if not inputs and not outputs:
        return model, inputs, outputs
    steps = PrePostProcessor(model)
    for name in inputs:
        steps.input(name).tensor().set_element_type(openvino.Type.bf16)
    for index in outputs:
        steps.output(index).tensor().set_element_type(openvino.Type.bf16)
    return steps.build(), inputs, outputs


class OpenVinoDeeBert(StepGraphModel):
    """A DeeBERT model on OpenVINO (CPU): `iter_exits`, `infer`, `plain_forward` as `DeeBert` has them."""

    borrows_outputs = True  # the layer graphs' hidden states are their requests' buffers (`_OpenVinoGraph.run`)

    def __init__(
        self, config: DeeBertConfig, directory: Path, manifest: Manifest, inference_precision: str, threads: int | None
    ) -> None:
        import openvino

        if inference_precision not in INFERENCE_PRECISIONS:
            raise ExportError(f"OpenVINO runs in {', '.join(INFERENCE_PRECISIONS)}, not {inference_precision}")
        self.inference_precision = inference_precision
        self._core = openvino.Core()
        self._properties: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": INFERENCE_PRECISIONS[inference_precision],
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
            # Kernels prepared per input shape: 7 graphs x (rows, tokens) outgrow the default 5,000 and thrash.
            "CPU_RUNTIME_CACHE_CAPACITY": RUNTIME_CACHE_CAPACITY,
            # OpenVINO pins its threads (and the calling one) to cores by default; in a process where ONNX
            # Runtime (a split) and the server's own threads run too, that pins them onto one another's cores.
            "ENABLE_CPU_PINNING": os.environ.get("DEEBERT_OPENVINO_PINNING", "0") == "1",
        }
        if threads:
            self._properties["INFERENCE_NUM_THREADS"] = threads
        self.length_bucket = length_bucket()
        super().__init__(config, directory, manifest)

    def load_graph(self, path: Path) -> StepGraph:
        return _OpenVinoGraph(self._core, path, self._properties, bf16_hidden=self.bf16_hidden)

    @property
    def bf16_hidden(self) -> bool:
        """Whether the layer graphs hand their hidden states to one another as bfloat16 (in bf16)."""
        return self.inference_precision == "bf16"

    @property
    def backend(self) -> str:
        return "openvino"

    @property
    def precision(self) -> str:
        if self.manifest.precision == "int8-static":
            return "int8-static"
        return "float32" if self.inference_precision == "fp32" else "bfloat16"


def load_openvino_model(
    model: Any, precision: str = "fp32", cache_dir: Path | None = None, threads: int | None = None
) -> OpenVinoDeeBert:
    """The OpenVINO backend for a loaded PyTorch `DeeBert` in `precision` (`fp32` or `bf16`): its standard-ONNX
    step graphs from the cache (exported first when missing, stale or corrupt), compiled for this CPU."""
    reason = openvino_unavailable_reason()
    if reason is not None:
        raise ExportError(f"the openvino backend cannot run here: {reason}")
    if precision == "bf16" and "bf16" not in supported_precisions():
        logger.warning("OpenVINO reports no BF16 capability on this CPU: bf16 runs emulated (slow)")
    # Static int8: the QDQ graphs, their unquantized rest compiled in f32; otherwise the fp32 graphs compiled
    # in the precision asked for.
    graphs = "int8-static" if precision == "int8-static" else "fp32"
    inference = "fp32" if precision == "int8-static" else precision

    def open_graphs(directory: Path, manifest: Manifest) -> StepGraphModel:
        return OpenVinoDeeBert(model.config, directory, manifest, inference, threads)

    loaded = load_cached_graphs(model, graphs, cache_dir, "openvino", open_graphs)
    assert isinstance(loaded, OpenVinoDeeBert)
    return loaded
