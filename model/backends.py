"""Which runtime runs the exit loop: `torch` (training, CUDA, fallback), `onnxruntime` or `openvino` (CPU).

All give the same `iter_exits` / `infer` / `plain_forward` / `all_off_ramp_logits` (`ExitModel`), so the
server's engine and `deebert evaluate` do not care which one runs. Which is fastest depends on the CPU, so
`auto` takes the choice `deebert tune` measured on this machine (`model.tune`); without one, ONNX Runtime
fp32 on the CPU when installed and torch everywhere else.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from model import exit_rule
from model.early_exit import EarlyExitModel, ExitResult, LayerExits, LoneRowExit, RefillBatch
from model.modeling import DeeBert

logger = logging.getLogger("deebert.backends")

BACKENDS = ("auto", "torch", "onnxruntime", "openvino")
# The precisions each CPU runtime computes in (torch's is its dtype).
RUNTIME_PRECISIONS = {"onnxruntime": ("fp32", "int8", "int8-static"), "openvino": ("fp32", "bf16", "int8-static")}


class BackendError(ValueError):
    """The requested backend cannot run here (not installed, or not on this device or dtype)."""


# What the engine and evaluation need of a backend: `DeeBert` (torch) and `OnnxDeeBert` are both one.
ExitModel = EarlyExitModel


def runtime_key(backend: str, precision: str) -> str:
    """The key of a runtime's own presets in the checkpoint (`DeeBertConfig.runtime_presets`)."""
    return f"{backend}-{precision}"


def pick_backend(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """`auto` → onnxruntime on the CPU in float32 when installed, else torch; explicit names are checked.
    (The server resolves `auto` through the tuned choice first: `model.tune.resolve_auto`.)"""
    from model.onnx_backend import onnxruntime_available
    from model.openvino_backend import openvino_available, openvino_unavailable_reason

    if requested not in BACKENDS:
        raise BackendError(f"unknown backend {requested!r}: use {', '.join(BACKENDS)}")
    if requested == "auto":
        if device.type != "cpu" or dtype != torch.float32:
            return "torch"
        if not onnxruntime_available():
            logger.info("backend auto: onnxruntime is not installed, running on torch")
            return "torch"
        return "onnxruntime"
    if requested == "onnxruntime":
        if device.type != "cpu":
            raise BackendError(
                f"the onnxruntime backend runs on the CPU; device {device} needs --backend torch (or --device cpu)"
            )
        if dtype != torch.float32:
            raise BackendError("the onnxruntime backend computes in fp32 (or --precision int8); use --dtype float32")
        if not onnxruntime_available():
            raise BackendError("--backend onnxruntime needs the onnxruntime package: pip install onnxruntime")
    if requested == "openvino":
        if device.type != "cpu":
            raise BackendError(f"the openvino backend runs on the CPU; device {device} needs --backend torch")
        if dtype != torch.float32:
            raise BackendError("the openvino backend takes --precision fp32 or bf16; use --dtype float32")
        if not openvino_available():
            raise BackendError(f"--backend openvino cannot run here: {openvino_unavailable_reason()}")
    return requested


def quiet_torch_threads() -> None:
    """One torch intra-op thread in a process that computes on ONNX Runtime or OpenVINO.

    Between the runtime's calls the exit loop does a handful of small torch operations (softmax, entropy, which
    rows leave); with torch's own pool of workers beside ONNX Runtime's, the two pools' spinning threads took
    each other's cores: on the 2-core EPYC here the batch-32 loop at `balanced` ran 1.7x slower
    (2.67 s vs 1.58 s for SST-2 dev). Torch's operations there are too small to gain from threads."""
    if torch.get_num_threads() != 1:
        logger.info(
            "torch keeps 1 intra-op thread (was %d): the layers run on ONNX Runtime or OpenVINO",
            torch.get_num_threads(),
        )
        torch.set_num_threads(1)


def load_backend(
    model: DeeBert,
    backend: str,
    precision: str = "fp32",
    cache_dir: str | Path | None = None,
    threads: int | None = None,
) -> ExitModel:
    """`model` itself for torch; its ONNX Runtime graphs (exported on first use, cached) for onnxruntime.

    A runtime with presets of its own in the checkpoint (`runtime_presets`, e.g. int8 calibrated on int8
    outputs) serves those, so a preset means what its dev numbers say on the runtime that serves it.
    """
    if backend == "torch":
        if precision != "fp32":
            raise BackendError(f"precision {precision} is for the onnxruntime and openvino backends; torch: --dtype")
        if model.precision == "bfloat16" and "torch-bf16" in model.config.runtime_presets:
            model.config = model.config.with_presets(model.config.runtime_presets["torch-bf16"])
        return model
    allowed = RUNTIME_PRECISIONS.get(backend, ())
    if precision not in allowed:
        raise BackendError(f"the {backend} backend computes in {' or '.join(allowed)}, not {precision}")
    from model.onnx_backend import load_onnx_model
    from model.openvino_backend import load_openvino_model

    cache = Path(cache_dir) if cache_dir else None
    exported: ExitModel
    if backend == "openvino":
        exported = load_openvino_model(model, precision, cache, threads)
    else:
        exported = load_onnx_model(model, precision, cache, threads)
    quiet_torch_threads()
    own = model.config.runtime_presets.get(runtime_key(backend, precision))
    if own is not None:
        exported.config = model.config.with_presets(own)
    elif precision != "fp32" and model.config.presets:
        logger.warning(
            "%s has no presets calibrated for %s %s; its presets were calibrated in fp32 "
            "(deebert calibrate --backend %s --precision %s stores its own)",
            model.config.name,
            backend,
            precision,
            backend,
            precision,
        )
    return exported


class SplitExitModel(EarlyExitModel):
    """Batches of one row on one runtime, larger batches on another: each where `deebert tune` measured it
    fastest (a CPU runtime with the least per-call overhead tends to win alone, one with the fastest matrix
    products in batches).

    Presets are the batch-1 runtime's; a preset's threshold is translated to the same preset of the batched
    runtime (its own calibration), so a preset means what its dev numbers say on whichever runtime answers.
    """

    computes_in_torch = False  # each runtime enters what it needs

    def __init__(self, single: ExitModel, batched: ExitModel) -> None:
        if (single.num_layers, single.config.num_labels) != (batched.num_layers, batched.config.num_labels):
            raise BackendError("the two runtimes of a split serve different models")
        self.packs_tokens = batched.packs_tokens  # only batches have padding
        self.single = single
        self.batched = batched
        self.config = single.config
        names = {p.name for p in batched.config.presets}
        self._batched_thresholds = {
            p.threshold: batched.config.preset(p.name).threshold for p in single.config.presets if p.name in names
        }

    @property
    def backend(self) -> str:
        return f"{self.single.backend}+{self.batched.backend}"

    @property
    def precision(self) -> str:
        return f"{self.single.precision}+{self.batched.precision}"

    @property
    def device(self) -> torch.device:
        return self.single.device

    def _for(self, rows: int) -> ExitModel:
        return self.single if rows == 1 else self.batched

    def _thresholds(self, rows: int, thresholds: Sequence[float] | torch.Tensor) -> Sequence[float] | torch.Tensor:
        if rows == 1 or not self._batched_thresholds:
            return thresholds
        values = thresholds.reshape(-1).tolist() if isinstance(thresholds, torch.Tensor) else list(thresholds)
        return [self._batched_thresholds.get(v, v) for v in values]

    def iter_exits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None,
        thresholds: Sequence[float] | torch.Tensor,
        compact: bool = True,
        criterion: exit_rule.ExitCriterion | None = None,
    ) -> Iterator[LayerExits]:
        rows = input_ids.shape[0]
        yield from self._for(rows).iter_exits(
            input_ids, attention_mask, token_type_ids, self._thresholds(rows, thresholds), compact, criterion
        )

    def exit_lone_row(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        token_type_ids: np.ndarray,
        threshold: float,
        criterion: exit_rule.ExitCriterion | None = None,
    ) -> LoneRowExit:
        return self.single.exit_lone_row(input_ids, attention_mask, token_type_ids, threshold, criterion)

    def infer(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None,
        thresholds: Sequence[float] | torch.Tensor,
        compact: bool = True,
        criterion: exit_rule.ExitCriterion | None = None,
    ) -> ExitResult:
        rows = input_ids.shape[0]
        return self._for(rows).infer(
            input_ids, attention_mask, token_type_ids, self._thresholds(rows, thresholds), compact, criterion
        )

    def _batched_refills(self, batches: Iterable[RefillBatch]) -> Iterator[RefillBatch]:
        for input_ids, attention_mask, token_type_ids, thresholds in batches:
            yield input_ids, attention_mask, token_type_ids, self._thresholds(2, thresholds)

    def iter_exits_refilled(
        self,
        batches: Iterable[RefillBatch],
        max_rows: int,
        criterion: exit_rule.ExitCriterion | None = None,
    ) -> Iterator[LayerExits]:
        """On the batched runtime: its calls hold many rows."""
        yield from self.batched.iter_exits_refilled(self._batched_refills(batches), max_rows, criterion)

    def infer_refilled(
        self,
        batches: Sequence[RefillBatch],
        max_rows: int,
        criterion: exit_rule.ExitCriterion | None = None,
    ) -> ExitResult:
        """On the batched runtime: its calls hold many rows."""
        return self.batched.infer_refilled(list(self._batched_refills(batches)), max_rows, criterion)

    def plain_forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self._for(input_ids.shape[0]).plain_forward(input_ids, attention_mask, token_type_ids)

    def all_off_ramp_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None
    ) -> torch.Tensor:
        return self._for(input_ids.shape[0]).all_off_ramp_logits(input_ids, attention_mask, token_type_ids)
