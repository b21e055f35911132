"""The ONNX Runtime backend: the exit loop of `model.early_exit` over the step graphs of `model.onnx_export`.

Each step is one `InferenceSession.run` on numpy arrays: one encoder layer and the off-ramp after it (the
first with the embeddings, the last with the final classifier);
the exit decision uses the same exit rule as the PyTorch backend on the off-ramp's logits (wrapped as a
tensor without a copy), and compaction slices the numpy hidden states and attention mask between calls.
All sessions share one intra-op thread pool (ONNX Runtime's global pool), so the layers run one after
another on the same threads instead of each session keeping its own spinning workers. A process that runs
batches on several streams at once (the server, `use_session_pools`) gives each session a pool of its own that
does not spin instead: ONNX Runtime allows no session a pool of its own beside the global one, and a stream's copy
of the graphs computes on fewer threads (`OnnxDeeBert.stream_copy`).

Graphs are cached per checkpoint content, precision and onnxruntime version (`cached_graphs`): the first
start exports them (seconds for the shipped 6-layer model), later starts load them; a cache entry that is
incomplete, corrupt or made by another version is rebuilt with a warning.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from model import exit_rule
from model.config import DeeBertConfig
from model.early_exit import EarlyExitModel, Tokens
from model.onnx_export import (
    EXIT_FILE,
    EXIT_THRESHOLD_INPUT,
    GRAPH_FORMAT,
    INT8_SELECTION,
    PAD_INDEX,
    PLAIN_FILE,
    POOL_WEIGHTS,
    UNPAD_INDEX,
    ExportError,
    Manifest,
    Quantization,
    export_graphs,
    file_digest,
    is_fused,
    layer_file,
    model_digest,
    packed_layer_file,
    parity_batch,
    runtime_version,
)

logger = logging.getLogger("deebert.onnx")

# A call whose padding is more than this share of its positions runs the packed layers (`pack_tokens`), others the
# fused padded ones. On an AVX2-only AMD EPYC (ONNX Runtime fp32, SST-2 dev in batches of 32 at `balanced`,
# BENCHMARKS.md §22) the packed layers ran length-sorted batches (3.6 % padding) at 0.95x the padded layers'
# texts/s, arrival-order batches split by length (20 %) at 1.07x and whole ones (49 %) at 1.43x.
PACK_ABOVE_PADDING = 0.1


def _mostly_padding(tokens: int, positions: int) -> bool:
    """Whether rows holding `tokens` real tokens in `positions` padded positions run the packed layers."""
    return 1.0 - tokens / positions > PACK_ABOVE_PADDING


_pool_lock = threading.Lock()
_global_pool_threads: int | None = None  # None: no session yet; -1: per-session pools
_SESSION_POOLS = -1


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def default_cache_dir() -> Path:
    """`DEEBERT_CACHE_DIR`, else `$XDG_CACHE_HOME/deebert` (default `~/.cache/deebert`)."""
    configured = os.environ.get("DEEBERT_CACHE_DIR")
    if configured:
        return Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "deebert"


def use_session_pools() -> bool:
    """From now on in this process, each session gets an intra-op pool of its own that does not spin, instead of
    the global pool (`session_options`): what runs batches on several streams at once needs, since each stream's
    copy of the graphs computes on fewer threads than a lone text's. Only before the process's first session: True
    when the process uses (or now will use) per-session pools."""
    global _global_pool_threads
    with _pool_lock:
        if _global_pool_threads is None:
            _global_pool_threads = _SESSION_POOLS
        return _global_pool_threads == _SESSION_POOLS


def uses_session_pools() -> bool:
    """Whether this process's sessions get pools of their own (`use_session_pools`)."""
    return _global_pool_threads == _SESSION_POOLS


def session_options(threads: int | None) -> Any:
    """Options for every session: one global intra-op pool of `threads` (default: ONNX Runtime's, one per
    physical core), set once per process before the first session; or, after `use_session_pools`, a pool of
    `threads` of the session's own whose threads block when idle (several sessions run one after another in the
    exit loop, and each one's workers spinning after its call would take the cores from the next one's)."""
    import onnxruntime as ort
    from onnxruntime.capi import _pybind_state

    global _global_pool_threads
    wanted = threads or 0
    with _pool_lock:
        if _global_pool_threads is None:
            try:
                _pybind_state.set_global_thread_pool_sizes(wanted, 1)
                _global_pool_threads = wanted
            except Exception as err:  # the environment exists already (another library made a session first)
                logger.warning("ONNX Runtime's global thread pool could not be set (%s); per-session pools", err)
                _global_pool_threads = _SESSION_POOLS
        elif _global_pool_threads not in (wanted, _SESSION_POOLS):
            logger.warning(
                "ONNX Runtime's thread pool was set to %d threads earlier in this process; %d ignored",
                _global_pool_threads,
                wanted,
            )
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    if _global_pool_threads == _SESSION_POOLS:
        options.intra_op_num_threads = wanted
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    else:
        options.use_per_session_threads = False
    return options


@dataclass
class _OrtState:
    """The rows still going through the encoder, as numpy arrays (compacted as rows leave): their token ids
    before layer 1, then the hidden states and the off-ramp's logits of the last layer run."""

    attention_mask: np.ndarray
    lengths: np.ndarray  # int32 [rows]: each row's real tokens (fused attention's mask)
    pool_weights: np.ndarray | None
    input_ids: np.ndarray | None = None
    token_type_ids: np.ndarray | None = None
    hidden: np.ndarray | None = None
    logits: np.ndarray | None = None
    # Whether the layers run packed for these rows (`PACK_ABOVE_PADDING`), and the packed layers' token indices
    # (`token_indices`), computed at the first layer that takes them.
    packed: bool = False
    token_indices: tuple[np.ndarray, np.ndarray] | None = None


class _Graph:
    """One step graph's session and the names of its inputs and outputs."""

    def __init__(self, path: Path, options: Any) -> None:
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.takes_pool_weights = POOL_WEIGHTS in self.inputs
        self.takes_token_types = "token_type_ids" in self.inputs
        self.takes_token_indices = UNPAD_INDEX in self.inputs
        # The compiled session's own `run`: `InferenceSession.run` first checks in Python that every input is
        # fed and that no OrtValue is foreign (our feeds are plain numpy arrays naming exactly `inputs`), a cost
        # paid on every layer's call. The public method when a future onnxruntime has no `_sess`.
        compiled = getattr(self.session, "_sess", None)
        self._run = compiled.run if compiled is not None and hasattr(compiled, "run") else self._public_run

    def _public_run(self, outputs: list[str], feeds: dict[str, np.ndarray], options: None) -> list[np.ndarray]:
        return self.session.run(outputs, feeds, options)  # type: ignore[no-any-return]

    def __call__(self, **feeds: np.ndarray) -> list[np.ndarray]:
        """Every output, in the graph's order."""
        return self.run({name: feeds[name] for name in self.inputs})

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Every output, from feeds that name exactly the graph's inputs (the exit loop's per-layer call)."""
        return self._run(self.outputs, feeds, None)  # type: ignore[no-any-return]


class StepGraph(Protocol):
    """One compiled step graph of a runtime that computes on numpy arrays."""

    inputs: list[str]
    takes_pool_weights: bool
    takes_token_types: bool
    takes_token_indices: bool  # a layer that runs on packed tokens (`model.onnx_export.pack_tokens`)

    def __call__(self, **feeds: np.ndarray) -> list[np.ndarray]: ...

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]: ...


class StepGraphModel(EarlyExitModel):
    """A DeeBERT model on a runtime of step graphs over numpy arrays (ONNX Runtime, OpenVINO): the exit loop's
    steps (`ExitSteps`), compaction and the batch-1 inputs, written once; a runtime supplies `load_graph`.

    A batch of one row that may leave early runs the exit graph (`model.onnx_export.write_exit_graph`): the
    whole loop in one call, the exit decided inside it by the entropy rule's graph form (`exit_in_one_call`)."""

    computes_in_torch = False
    # Whether a layer's outputs are the runtime's own buffers, overwritten by its next call (`ExitSteps`).
    borrows_outputs = False
    # Token counts are padded up to a multiple of this before the graphs see them (1: not at all). A runtime that
    # compiles kernels per input shape (OpenVINO) then meets a few shapes instead of every length.
    length_bucket = 1

    def __init__(self, config: DeeBertConfig, directory: Path, manifest: Manifest, layers_only: bool = False) -> None:
        """`layers_only`: only the layer graphs (and their packed forms), not the full graph nor the exit graph, each
        a copy of the weights: full-depth batches then run the layers in turn and a lone row the steps (a stream
        copy, `OnnxDeeBert.stream_copy`, which runs batches)."""
        if manifest.num_layers != config.num_layers or manifest.num_labels != config.num_labels:
            raise ExportError(
                f"{directory}: graphs for {manifest.num_layers} layers / {manifest.num_labels} labels, "
                f"checkpoint has {config.num_layers} / {config.num_labels}"
            )
        self.config = config
        self.directory = directory
        self.manifest = manifest
        self.layers = [self.load_graph(directory / layer_file(i)) for i in range(1, config.num_layers + 1)]
        # Each layer's packed form where the export has one (`model.onnx_export.pack_tokens`), else None.
        self.packed_layers = [
            self.load_graph(directory / packed_layer_file(i)) if packed_layer_file(i) in manifest.files else None
            for i in range(1, config.num_layers + 1)
        ]
        self._packs = any(layer is not None for layer in self.packed_layers)
        # Batches stay whole (`model.tokenization.split_tokens_setting`) only when every layer can skip the padding.
        self.packs_tokens = all(layer is not None for layer in self.packed_layers)
        self.plain = None if layers_only else self.load_graph(directory / PLAIN_FILE)
        # A lone row's whole exit loop in one call (`exit_in_one_call`); None in an export made without it.
        with_exit_graph = EXIT_FILE in manifest.files and not layers_only
        self.exit_graph = self.load_graph(directory / EXIT_FILE) if with_exit_graph else None
        if self.exit_graph is not None and manifest.parity.get("exit_graph_same_exits") is False:
            logger.warning(
                "%s: the exit graph left at other layers than the step graphs at export (manifest parity); "
                "lone rows take the step graphs",
                directory,
            )
            self.exit_graph = None
        self._hidden_inputs = [f"hidden_{i}" for i in range(config.num_layers + 1)]
        self._layer_mask_input = manifest.layer_mask_input
        self._masks_by_length = self._layer_mask_input != "attention_mask"
        self._pools_by_mean = any(layer.takes_pool_weights for layer in self.layers)
        self._unpadded_inputs: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
        self._bucketed_inputs: dict[tuple[int, int], tuple[np.ndarray, np.ndarray | None]] = {}

    def load_graph(self, path: Path) -> StepGraph:
        """The runtime's compiled graph of one step."""
        raise NotImplementedError

    # --- facts -----------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def precision(self) -> str:
        return "float32" if self.manifest.precision == "fp32" else self.manifest.precision

    # --- ExitSteps -------------------------------------------------------------------------------

    def start(self, input_ids: Tokens, attention_mask: Tokens, token_type_ids: Tokens | None) -> _OrtState:
        ids, types, mask = self._token_arrays(input_ids, attention_mask, token_type_ids)
        lengths, weights = self._mask_inputs(mask)
        return self._new_state(mask, lengths, weights, input_ids=ids, token_type_ids=types)

    def _new_state(
        self,
        attention_mask: np.ndarray,
        lengths: np.ndarray,
        weights: np.ndarray | None,
        input_ids: np.ndarray | None = None,
        token_type_ids: np.ndarray | None = None,
        hidden: np.ndarray | None = None,
    ) -> _OrtState:
        """A state for these rows, running the packed layers when padding is more than `PACK_ABOVE_PADDING` of
        their positions."""
        state = _OrtState(attention_mask, lengths, weights, input_ids, token_type_ids, hidden)
        state.packed = self._packs and _mostly_padding(int(lengths.sum()), attention_mask.size)
        return state

    def run_layer(self, state: _OrtState, layer_number: int) -> _OrtState:
        layer = (state.packed and self.packed_layers[layer_number - 1]) or self.layers[layer_number - 1]
        # One dict per call, naming exactly the graph's inputs (this runs once per layer per batch; at batch 1
        # the Python around the ORT call is a measurable share of a layer).
        if layer_number == 1:
            feeds = self._feeds(layer, state, self._token_inputs(layer, state))
            state.input_ids = state.token_type_ids = None
        else:
            assert state.hidden is not None
            feeds = self._feeds(layer, state, {self._hidden_inputs[layer_number - 1]: state.hidden})
        outputs = layer.run(feeds)
        state.hidden = outputs[0] if layer_number < self.num_layers else None
        state.logits = outputs[-1]
        return state

    def _token_inputs(self, graph: StepGraph, state: _OrtState) -> dict[str, np.ndarray]:
        """The token ids (and types, if `graph` takes them) of a graph that starts from them: layer 1's, the
        exit graph's."""
        assert state.input_ids is not None and state.token_type_ids is not None
        inputs = {"input_ids": state.input_ids}
        if graph.takes_token_types:
            inputs["token_type_ids"] = state.token_type_ids
        return inputs

    def _feeds(self, graph: StepGraph, state: _OrtState, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`inputs` with what every step graph takes besides: the layers' mask (see `Manifest.layer_mask_input`)
        and, when the off-ramps pool by mean, the pooling weights (no input when they pool the first token)."""
        inputs[self._layer_mask_input] = state.lengths if self._masks_by_length else state.attention_mask
        if graph.takes_pool_weights:
            assert state.pool_weights is not None
            inputs[POOL_WEIGHTS] = state.pool_weights
        if graph.takes_token_indices:
            if state.token_indices is None:
                state.token_indices = token_indices(state.lengths, state.attention_mask.shape[1])
            inputs[UNPAD_INDEX], inputs[PAD_INDEX] = state.token_indices
        return inputs

    def off_ramp_logits(self, state: _OrtState, layer_number: int) -> torch.Tensor:
        """Computed in the layer's call (`run_layer`), read here without a copy."""
        assert state.logits is not None
        return torch.from_numpy(state.logits)

    def off_ramp_row(self, state: _OrtState, layer_number: int) -> list[float]:
        """A lone row's off-ramp logits as Python numbers, without torch (`early_exit.exit_one`)."""
        assert state.logits is not None
        return state.logits[0].tolist()  # type: ignore[no-any-return]

    def full_depth_logits(
        self, input_ids: Tokens, attention_mask: Tokens, token_type_ids: Tokens | None
    ) -> torch.Tensor | None:
        """One call of the fused full graph: measured 8 % faster at batch 1 than the n layer graphs in turn
        (the same kernels; fewer calls and better-warmed caches), so full-depth batches take it. Not a batch
        with much padding when the layers pack (None: the loop runs them, packed): SST-2 dev in arrival order,
        batches of 32, ran 1.5x faster so (BENCHMARKS.md §23). None without a full graph (`layers_only`)."""
        if self.plain is None or self._runs_packed(_numpy(attention_mask)):
            return None
        return self.plain_forward(input_ids, attention_mask, token_type_ids)

    def full_depth_row(
        self, input_ids: Tokens, attention_mask: Tokens, token_type_ids: Tokens | None
    ) -> list[float] | None:
        """`full_depth_logits` of a lone row as Python numbers, without torch (`early_exit.exit_one`)."""
        ids, types, mask = self._token_arrays(input_ids, attention_mask, token_type_ids)
        if self.plain is None or self._runs_packed(mask):
            return None
        return self.plain(input_ids=ids, attention_mask=mask, token_type_ids=types)[0][0].tolist()  # type: ignore[no-any-return]

    def _runs_packed(self, attention_mask: np.ndarray) -> bool:
        """Whether rows with this mask run the packed layers (`PACK_ABOVE_PADDING`) rather than the full graph."""
        if not self._packs or (attention_mask.shape[0] == 1 and attention_mask[0, -1]):  # a lone unpadded row
            return False
        return _mostly_padding(int(attention_mask.sum()), attention_mask.size)

    def keep_rows(self, state: _OrtState, keep_index: torch.Tensor) -> _OrtState:
        assert state.hidden is not None  # rows leave after a layer, never before the first
        rows = keep_index.numpy()
        lengths = state.lengths[rows]
        longest = _round_up(int(lengths.max()), self.length_bucket)
        # Each an indexing step (rows, then the padding no row left needs): a new C-contiguous array, as ONNX
        # Runtime reads it without a copy. The pooling weights of a row do not change when padding is cut.
        attention_mask = state.attention_mask[rows, :longest]
        weights = None if state.pool_weights is None else state.pool_weights[rows, :longest]
        return self._new_state(attention_mask, lengths, weights, hidden=state.hidden[rows, :longest])

    def join(self, parts: Sequence[tuple[_OrtState, torch.Tensor]]) -> _OrtState:
        """The rows at each part's index of its state in one state: each row's hidden states copied once, into
        an array as wide as the longest row needs (bucketed); the masks follow from the rows' lengths."""
        selected = []
        for state, index in parts:
            assert state.hidden is not None  # rows join after a layer, never before the first
            selected.append((state.hidden, index.numpy()))
        lengths = np.concatenate([state.lengths[rows] for (state, _), (_, rows) in zip(parts, selected, strict=True)])
        tokens = _round_up(int(lengths.max()), self.length_bucket)
        width = selected[0][0].shape[2]
        hidden = np.empty((len(lengths), tokens, width), selected[0][0].dtype)
        at = 0
        for source, rows in selected:
            block = hidden[at : at + len(rows)]
            if source.shape[1] >= tokens:
                np.take(source[:, :tokens], rows, axis=0, out=block)
            else:  # a narrower call's rows: their own tokens, then masked zeros
                block[:, : source.shape[1]] = source[rows]
                block[:, source.shape[1] :] = 0
            at += len(rows)
        attention_mask = (np.arange(tokens) < lengths[:, None]).astype(np.int64)
        weights = pool_weights(attention_mask, lengths) if self._pools_by_mean else None
        return self._new_state(attention_mask, lengths, weights, hidden=hidden)

    def _token_arrays(
        self, input_ids: Tokens, attention_mask: Tokens, token_type_ids: Tokens | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Token ids, token types and mask as the graphs take them: int64 numpy, padded to `length_bucket`."""
        ids = _numpy(input_ids)
        types = np.zeros_like(ids) if token_type_ids is None else _numpy(token_type_ids)
        mask = _numpy(attention_mask)
        if self.length_bucket > 1 and ids.shape[1] % self.length_bucket:
            ids, types, mask = _pad_tokens(self.length_bucket, ids, types, mask)
        return ids, types, mask

    def _mask_inputs(self, attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Each row's length (int32) and, when the off-ramps pool by mean, the pooling weights: what the
        layer graphs take besides the hidden states (the lengths are fused attention's mask).

        A batch of one unpadded row (every batch-1 request) takes them from a cache by length: right after a
        runtime call the CPU's caches hold the model's weights, not numpy's code, so these few reductions cost
        a noticeable share of a layer at batch 1."""
        rows, tokens = attention_mask.shape
        if rows == 1 and attention_mask[0, -1]:  # one row, no padding (masks are right-padded): the common case
            unpadded = self._unpadded_inputs.get(tokens)
            if unpadded is None:
                unpadded = self._unpadded_inputs[tokens] = self._compute_mask_inputs(np.ones((1, tokens), np.int64))
            return unpadded
        if rows == 1 and self.length_bucket > 1:  # one row padded to its bucket: cached by (tokens, length)
            key = (tokens, int(attention_mask[0].sum()))
            cached = self._bucketed_inputs.get(key)
            if cached is None:
                cached = self._bucketed_inputs[key] = self._compute_mask_inputs(attention_mask.copy())
            return cached
        return self._compute_mask_inputs(attention_mask)

    def _compute_mask_inputs(self, attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        lengths = attention_mask.sum(axis=1, dtype=np.int32)
        weights = pool_weights(attention_mask, lengths) if self._pools_by_mean else None
        for array in (lengths, weights):
            if array is not None:
                array.flags.writeable = False  # may be cached and shared between calls (ORT only reads inputs)
        return lengths, weights

    def exit_in_one_call(
        self,
        input_ids: Tokens,
        attention_mask: Tokens,
        token_type_ids: Tokens | None,
        threshold: float,
    ) -> tuple[int, list[float]] | None:
        """One row's exit layer and that off-ramp's logits from one call of the exit graph (None without one).
        The graph decides by DeeBERT's entropy rule; callers with another rule take the loop."""
        graph = self.exit_graph
        if graph is None:
            return None
        state = self.start(input_ids, attention_mask, token_type_ids)
        threshold_input = np.array(threshold, dtype=np.float32)
        feeds = self._feeds(graph, state, {**self._token_inputs(graph, state), EXIT_THRESHOLD_INPUT: threshold_input})
        logits, layer = graph.run(feeds)
        return int(layer[0]), logits[0].tolist()

    # --- inference -------------------------------------------------------------------------------

    def exit_steps(self) -> StepGraphModel:
        return self

    def plain_forward(
        self, input_ids: Tokens, attention_mask: Tokens, token_type_ids: Tokens | None = None
    ) -> torch.Tensor:
        """The final classifier's logits from one full-depth graph (the plain runtime's baseline)."""
        if self.plain is None:
            raise ExportError(f"{self.directory}: this copy holds the layer graphs only (no full graph)")
        ids, types, mask = self._token_arrays(input_ids, attention_mask, token_type_ids)
        logits = self.plain(input_ids=ids, attention_mask=mask, token_type_ids=types)[0]
        return torch.from_numpy(logits)

    def all_off_ramp_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None
    ) -> torch.Tensor:
        """Every off-ramp's logits, [layers, batch, labels] (evaluation sweeps)."""
        state = self.start(input_ids, attention_mask, token_type_ids)
        logits = []
        for layer_number in range(1, self.num_layers + 1):
            state = self.run_layer(state, layer_number)
            logits.append(self.off_ramp_logits(state, layer_number))
        return torch.stack(logits)


class OnnxDeeBert(StepGraphModel):
    """A DeeBERT model on ONNX Runtime (CPU): `iter_exits`, `infer`, `plain_forward` as `DeeBert` has them."""

    def __init__(
        self,
        config: DeeBertConfig,
        directory: Path,
        manifest: Manifest,
        threads: int | None,
        layers_only: bool = False,
    ) -> None:
        self._options = session_options(threads)
        super().__init__(config, directory, manifest, layers_only)

    def load_graph(self, path: Path) -> StepGraph:
        return _Graph(path, self._options)

    def stream_copy(self, threads: int) -> OnnxDeeBert | None:
        """The layer graphs in sessions of `threads` threads each, for one of several batch streams at once
        (ONNX Runtime's sessions take concurrent calls, so the streams share the copy). Without the full and exit
        graphs, which batches under load rarely need (a full-depth batch runs the layers in turn, a lone row the
        steps): on the shipped 6-layer model they are about half of the graphs' weights (175 of 355 MB on disk).
        None in a process on the global pool, where no session can have fewer threads (`use_session_pools`)."""
        if not uses_session_pools():
            return None
        return OnnxDeeBert(self.config, self.directory, self.manifest, threads, layers_only=True)

    @property
    def backend(self) -> str:
        return "onnxruntime"


def pool_weights(attention_mask: np.ndarray, lengths: np.ndarray | None = None) -> np.ndarray:
    """Mean pooling's per-token weights, [rows, tokens, 1] float32: the mask over each row's number of real
    tokens (`lengths`, summed here when not given), as the traced model computes them (the layer graphs take
    them as `POOL_WEIGHTS`)."""
    if lengths is None:
        lengths = attention_mask.sum(axis=1)
    counts = np.maximum(lengths, 1).astype(np.float32)
    return attention_mask[:, :, None].astype(np.float32) / counts[:, None, None]


def token_indices(lengths: np.ndarray, tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """A packed layer's `UNPAD_INDEX` and `PAD_INDEX` (int64) for right-padded rows of `lengths` real tokens in
    `tokens` positions: where each real token sits in the padded [rows × tokens] layout, and which real token each
    padded position reads (a padding position reads its row's first; attention masks it and the layer's output
    there is never read as a token)."""
    positions = np.arange(tokens, dtype=np.int64)
    real = positions < lengths.astype(np.int64)[:, None]
    starts = np.cumsum(lengths, dtype=np.int64) - lengths
    pad_index = np.where(real, starts[:, None] + positions, starts[:, None]).reshape(-1)
    unpad_index = np.flatnonzero(real).astype(np.int64)
    return unpad_index, pad_index


def _round_up(tokens: int, multiple: int) -> int:
    return -(-tokens // multiple) * multiple


def _pad_tokens(multiple: int, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """Right-pad [rows, tokens] arrays with zeros (pad id, no attention) to a multiple of `multiple` tokens."""
    tokens = arrays[0].shape[1]
    extra = _round_up(tokens, multiple) - tokens
    return tuple(np.pad(array, ((0, 0), (0, extra))) for array in arrays)


def _numpy(tensor: Tokens) -> np.ndarray:
    """int64 numpy view of a CPU tensor (no copy when it already is one)."""
    array = tensor.numpy() if isinstance(tensor, torch.Tensor) else tensor
    return np.ascontiguousarray(array, dtype=np.int64)


# --- the graph cache -----------------------------------------------------------------------------


def cache_entry(cache_dir: Path, digest: str, precision: str, runtime: str = "onnxruntime") -> Path:
    """Where `runtime`'s graphs of these weights in this precision are cached (keyed by the runtime's version)."""
    folder, short = ("openvino", "ov") if runtime == "openvino" else ("onnx", "ort")
    # OpenVINO's version names its build too ("2026.4.1-22982-e213a147257-releases/2026/4"): one path segment.
    version = re.sub(r"[^A-Za-z0-9.]+", "_", runtime_version(runtime))
    return cache_dir / folder / f"{digest[:24]}-{precision}-{short}{version}-g{GRAPH_FORMAT}"


def check_export(directory: Path, digest: str | None, precision: str, runtime: str = "onnxruntime") -> Manifest:
    """The manifest of a complete, intact export for these weights and this runtime's version; ExportError
    saying what is wrong otherwise."""
    manifest = Manifest.read(directory)
    if manifest.format != GRAPH_FORMAT:
        raise ExportError(f"graph format {manifest.format}, this version writes {GRAPH_FORMAT}")
    installed = runtime_version(runtime)
    if (manifest.runtime, manifest.runtime_version) != (runtime, installed):
        raise ExportError(f"exported for {manifest.runtime} {manifest.runtime_version}, running {runtime} {installed}")
    if digest is not None and manifest.checkpoint_digest != digest:
        raise ExportError("exported from other weights")
    if manifest.precision != precision:
        raise ExportError(f"holds {manifest.precision} graphs, not {precision}")
    if precision == "int8":
        wanted = Quantization()
        held = manifest.quantization or {}
        if (held.get("ops"), held.get("per_channel")) != (wanted.ops, wanted.per_channel):
            raise ExportError(f"quantized as {held.get('method', 'unknown')}, not {wanted.describe()}")
        if held.get("selection") != INT8_SELECTION:
            raise ExportError("quantized by an older rule for which products to quantize")
    if not manifest.files:
        raise ExportError("the manifest lists no graphs")
    if is_fused(runtime, precision) and manifest.pool_products is None:
        raise ExportError("made before mean pooling was one matrix product in the fused graphs")
    if is_fused(runtime, precision) and manifest.packed_layers is None:
        raise ExportError("made before the fused layers ran on packed tokens")
    if EXIT_FILE not in manifest.files:
        raise ExportError(f"made before the one-call exit graph ({EXIT_FILE})")
    for name, expected in manifest.files.items():
        path = directory / name
        if not path.is_file():
            raise ExportError(f"{name} is missing")
        if file_digest(path) != expected:
            raise ExportError(f"{name} is corrupt (its checksum does not match the manifest)")
    return manifest


def graph_digest(model: Any, precision: str) -> str:
    """What a precision's graphs depend on: the weights, and for static int8 the stored activation ranges."""
    digest = model_digest(model)
    if precision != "int8-static":
        return digest
    from model.int8 import ranges_digest

    return hashlib.sha256((digest + ranges_digest(model.config.int8_ranges)).encode()).hexdigest()


# Opens a runtime's graphs of a directory with its manifest.
GraphOpener = Callable[[Path, Manifest], StepGraphModel]


def load_onnx_model(
    model: Any,
    precision: str = "fp32",
    cache_dir: Path | None = None,
    threads: int | None = None,
) -> OnnxDeeBert:
    """The ONNX Runtime backend for a loaded PyTorch `DeeBert`: its graphs from the cache, exported first when
    missing, stale or corrupt (with a warning saying why, and how long the export took). The cache holds only
    the default quantization (`check_export`), so none other is offered here: `export` writes the others."""

    def open_graphs(directory: Path, manifest: Manifest) -> StepGraphModel:
        return OnnxDeeBert(model.config, directory, manifest, threads)

    loaded = load_cached_graphs(model, precision, cache_dir, "onnxruntime", open_graphs)
    assert isinstance(loaded, OnnxDeeBert)
    return loaded


def load_cached_graphs(
    model: Any, precision: str, cache_dir: Path | None, runtime: str, open_graphs: GraphOpener
) -> StepGraphModel:
    """`runtime`'s step graphs of `model` from the cache, exported first when missing, stale or corrupt (with a
    warning saying why)."""
    digest = graph_digest(model, precision)
    directory = cache_entry(cache_dir or default_cache_dir(), digest, precision, runtime)
    try:
        manifest = check_export(directory, digest, precision, runtime)
        return open_graphs(directory, manifest)
    except ExportError as err:
        if directory.exists():
            logger.warning("%s graph cache %s is unusable (%s): exporting again", runtime, directory, err)
    except Exception as err:  # a file that passed its checksum but does not load: rebuild it as well
        logger.warning("%s graph cache %s failed to load (%s): exporting again", runtime, directory, err)
    return export(model, directory, precision, digest=digest, runtime=runtime, open_graphs=open_graphs)


def export(
    model: Any,
    directory: Path,
    precision: str = "fp32",
    quantization: Any = None,
    digest: str | None = None,
    threads: int | None = None,
    runtime: str = "onnxruntime",
    open_graphs: GraphOpener | None = None,
) -> StepGraphModel:
    """Export `model`'s graphs for `runtime` into `directory`, load them (`open_graphs`; default ONNX Runtime
    with `threads`), and record in the manifest how far their logits are from the PyTorch model's (every
    off-ramp, a random padded batch)."""
    started = time.perf_counter()
    manifest = export_graphs(model, directory, precision, quantization=quantization, digest=digest, runtime=runtime)
    if open_graphs is None:
        exported: StepGraphModel = OnnxDeeBert(model.config, directory, manifest, threads)
    else:
        exported = open_graphs(directory, manifest)
    manifest.parity = measure_parity(model, exported)
    manifest.write(directory)
    logger.info(
        "exported %s %s graphs to %s in %.1f s; max |logit difference| vs PyTorch %.2g (labels %s)",
        precision,
        runtime,
        directory,
        time.perf_counter() - started,
        manifest.parity["max_abs_logit_difference"],
        "the same" if manifest.parity["same_labels_every_layer"] else "DIFFER",
    )
    return exported


def measure_parity(model: Any, exported: StepGraphModel) -> dict[str, Any]:
    """Every off-ramp's logits from the graphs vs the PyTorch model on a random padded batch."""
    reference_model = copy.deepcopy(model).to(torch.float32).cpu().eval()
    inputs = parity_batch(reference_model)
    reference = reference_model.all_off_ramp_logits(*inputs)
    graphs = exported.all_off_ramp_logits(*inputs)
    difference = (reference - graphs).abs()
    same_labels = bool((reference.argmax(-1) == graphs.argmax(-1)).all())
    return {
        "batch": list(inputs[0].shape),
        "max_abs_logit_difference": float(difference.max()),
        "per_layer_max_abs_logit_difference": [float(d) for d in difference.amax(dim=(1, 2))],
        "same_labels_every_layer": same_labels,
        # Thresholds closer to an entropy than a few times the graphs' own rounding (against PyTorch) may tie.
        **exit_graph_parity(exported, inputs, margin=max(1e-4, 4 * float(difference.max()))),
    }


def exit_graph_parity(exported: StepGraphModel, inputs: tuple[torch.Tensor, ...], margin: float) -> dict[str, Any]:
    """Each row of `inputs` alone, at thresholds `2 * margin` above each intermediate off-ramp's entropy (and one
    that every off-ramp meets): whether the exit graph leaves where the step graphs' off-ramps say DeeBERT's rule
    leaves, and how far its logits are from theirs (nothing without an exit graph). A threshold within `margin`
    of some entropy is skipped: the two computations round differently (bf16 most of all), and a tie may go
    either way. A model whose exit graph disagrees is served without it."""
    if exported.exit_graph is None:
        return {}
    rule = exit_rule.EntropyCriterion()
    same, largest, checked = True, 0.0, 0
    input_ids, attention_mask, token_type_ids = inputs
    for row in range(input_ids.shape[0]):
        length = int(attention_mask[row].sum())
        ids, mask, types = (tensor[row : row + 1, :length] for tensor in (input_ids, attention_mask, token_type_ids))
        off_ramps = exported.all_off_ramp_logits(ids, mask, types)  # [layers, 1, labels]
        probabilities, entropies = rule.outputs(off_ramps)
        candidates = [float(entropy) + 2 * margin for entropy in entropies[:-1, 0]] + [1e9]
        thresholds = torch.tensor([t for t in candidates if bool(((entropies - t).abs() >= margin).all())])
        # Where the step graphs' off-ramps say the rule leaves (0-based), each threshold a row of a sweep.
        expected = rule.first_exit_layers(probabilities, entropies, thresholds[:, None])[:, 0] + 1
        for threshold, layer_expected in zip(thresholds.tolist(), expected.tolist(), strict=True):
            found = exported.exit_in_one_call(ids, mask, types, threshold)
            assert found is not None
            layer, logits = found
            same = same and layer == layer_expected
            checked += 1
            largest = max(largest, float((torch.tensor(logits) - off_ramps[layer - 1, 0]).abs().max()))
    return {
        "exit_graph_same_exits": same,
        "exit_graph_thresholds_checked": checked,
        "exit_graph_max_abs_logit_difference": largest,
    }
