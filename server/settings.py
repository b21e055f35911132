"""Server settings: one object, from CLI flags and `DEEBERT_*` environment variables."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, TypeAdapter, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

logger = logging.getLogger("deebert.server")

# Shadow sampling's fraction when an agreement target turns it on (DEEBERT_SHADOW_FRACTION unset).
AGREEMENT_SHADOW_FRACTION = 0.1


def default_checkpoint() -> str:
    """The shipped SST-2 checkpoint: ./weights/... when run from a checkout, else beside the installed code."""
    relative = Path("weights/sst2-minilm-l6")
    if relative.is_dir():
        return str(relative)
    return str(Path(__file__).resolve().parents[1] / relative)


class ServerSettings(BaseSettings):
    """Every knob of `deebert serve`; each is also `DEEBERT_<NAME>` in the environment."""

    model_config = SettingsConfigDict(env_prefix="DEEBERT_", extra="ignore")

    checkpoint: str = Field(default_factory=default_checkpoint, description="DeeBERT checkpoint directory (or hub id)")
    host: str = Field("127.0.0.1", description="address to bind; 0.0.0.0 exposes the server to the network")
    port: int = Field(8000, ge=0, le=65535)
    device: str = Field("auto", description="auto (CUDA when available, else CPU), cpu, cuda, cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="compute dtype; auto = float16 on CUDA, float32 on CPU"
    )
    backend: Literal["auto", "torch", "onnxruntime", "openvino"] = Field(
        "auto",
        description="inference backend: auto = the runtime `deebert tune` measured fastest on this CPU (a short "
        "tune at first start), torch on CUDA; torch; onnxruntime (CPU); openvino (CPU)",
    )
    precision: Literal["fp32", "bf16", "int8"] = Field(
        "fp32",
        description="onnxruntime: fp32 or int8 (dynamic quantization of the encoder layers); openvino: fp32 or bf16",
    )
    tune_budget_s: float = Field(
        120.0,
        ge=0,
        description="backend auto on the CPU without a tuned choice for this CPU and checkpoint: tune for at most "
        "about this long at first start (cached after); 0 = no tune, onnxruntime fp32 (run `deebert tune`)",
    )
    cache_dir: str | None = Field(
        None, description="where exported ONNX graphs are cached (default: $XDG_CACHE_HOME/deebert or ~/.cache/deebert)"
    )
    threads: int | None = Field(
        None, ge=1, description="CPU threads of torch or ONNX Runtime (default: the runtime's choice)"
    )
    max_batch_size: int = Field(32, ge=1, description="most texts in one forward pass")
    max_wait_ms: float = Field(
        0.0, ge=0, description="how long the batcher waits to fill a batch; 0 = batch what queued while busy"
    )
    max_queue_size: int = Field(1024, ge=1, description="most texts waiting; beyond it requests get 429")
    max_texts_per_request: int = Field(64, ge=1, description="more texts in one request get 413")
    max_length: int | None = Field(None, ge=2, description="max tokens per text (default: the checkpoint's)")
    default_threshold: str | None = Field(
        None, description="threshold when a request sets none: a number or preset name (default: balanced)"
    )
    api_key: SecretStr | None = Field(None, description="if set, inference routes require 'Authorization: Bearer'")
    api_key_metrics: bool = Field(
        False, description="GET /metrics requires the API key too (default: exempt, so scrapers need no secret)"
    )
    api_key_health: bool = Field(
        False, description="/health/live and /health/ready require the API key too (default: exempt, for probes)"
    )
    max_body_bytes: int = Field(1_048_576, ge=1024, description="larger request bodies get 413 before parsing")
    compaction: bool = Field(
        True, description="remove exited rows from the batch; false keeps them in (masked), for benchmarks only"
    )
    batch_split_tokens: int | None = Field(
        None,
        ge=0,
        description="run a batch of texts of unlike lengths as several calls over texts of like length when that "
        "saves more padded tokens than this per extra call; 0 = never; default: 100 on the CPU, 0 on a GPU and for "
        "layers that skip the padding themselves (ONNX Runtime fp32)",
    )
    batch_streams: int | None = Field(
        None,
        ge=1,
        description="under load, run this many batches at once, each on its share of the threads (a lone text and a "
        "batch with nothing waiting behind it still get all of them); default: 2 on the CPU with ONNX Runtime and at "
        "least 2 threads, else 1 (ONNX Runtime only: other runtimes run one batch at a time)",
    )
    warmup: bool = Field(True, description="run warm-up batches before reporting ready")
    batches_on_loop: Literal["none", "alone", "all"] = Field(
        "alone",
        description="which batches run on the event loop instead of the batch thread: alone = a text alone in the "
        "server (0.025-0.06 ms less per request); all = every batch while quick, after the loop has queued the "
        "requests it accepted (more throughput on some CPUs whose cores the model's threads fill, none on others; "
        "requests arriving during a batch wait unread, unseen by the queue-depth metric); none = the thread",
    )
    rewarm_when_idle: bool = Field(
        True,
        description="on the CPU, once the server falls idle after a batch, tokenize a short text, so that the next "
        "request tokenizes with warm caches (~0.05 ms less of its overhead)",
    )
    drain_timeout_s: float = Field(30.0, ge=0, description="how long SIGTERM waits for accepted work")
    allocator: Literal["auto", "jemalloc", "tcmalloc", "system"] = Field(
        "auto",
        description="memory allocator: auto = jemalloc when installed (flat memory under load), else glibc; "
        "serve re-runs itself once with LD_PRELOAD to switch",
    )
    malloc_arenas: int = Field(
        2, ge=0, description="glibc only: cap on malloc arenas (resident memory under load); 0 = glibc's default"
    )
    memory_trim_interval_s: float = Field(
        10.0,
        ge=0,
        description="glibc only: return freed heap to the system this long after work once idle, every 6x under load",
    )
    brownout_queue_wait_ms: float | None = Field(
        None,
        gt=0,
        description="brownout: while texts wait longer than this in the queue, requests that set no threshold get "
        "brownout_threshold (marked X-Exit-Degraded: true) until the queue drains; unset = off",
    )
    brownout_threshold: str = Field(
        "fast", description="brownout ceiling: a number or preset name, used only if it exits earlier than the default"
    )
    shadow_fraction: float | None = Field(
        None,
        ge=0,
        le=1,
        description="share of answered texts also run to full depth while the batcher is idle, counting in "
        "deebert_exit_agreement_total whether the labels agree; 0 = off; unset = off, or "
        f"{AGREEMENT_SHADOW_FRACTION} with target_agreement",
    )
    target_agreement: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="hold this share of answers equal to the full model's (measured by shadow sampling) by moving "
        "the default threshold between full depth and controller_ceiling; unset = off",
    )
    target_p99_ms: float | None = Field(
        None,
        gt=0,
        description="hold the p99 request time under this by moving the default threshold toward "
        "controller_ceiling under load and back when it falls; unset = off (replaces brownout)",
    )
    agreement_floor: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="with both targets: latency may lower agreement down to this floor, not further "
        "(unset = target_agreement: latency never trades agreement below the target)",
    )
    controller_ceiling: str = Field(
        "fast", description="the most aggressive default the controller may set: a number or preset name"
    )
    controller_interval_s: float = Field(0.5, gt=0, description="how often the controller looks at its evidence")
    controller_state: str | None = Field(
        None, description="file the controller saves its state to and resumes from on start; unset = nothing kept"
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"

    @model_validator(mode="after")
    def _renamed_settings(self) -> ServerSettings:
        """DEEBERT_INLINE_ALONE (until 3bab6be) still works, with a warning: true is DEEBERT_BATCHES_ON_LOOP=alone,
        false is none (the new name wins when both are set)."""
        old = os.environ.get("DEEBERT_INLINE_ALONE")
        if old is None or "batches_on_loop" in self.model_fields_set:
            return self
        try:
            inline_alone = TypeAdapter(bool).validate_python(old.strip())  # booleans as any other setting reads them
        except ValidationError:
            raise ValueError(
                f"DEEBERT_INLINE_ALONE={old!r} is not a boolean (it is now DEEBERT_BATCHES_ON_LOOP)"
            ) from None
        self.batches_on_loop = "alone" if inline_alone else "none"
        logger.warning("DEEBERT_INLINE_ALONE is now DEEBERT_BATCHES_ON_LOOP; read as %s", self.batches_on_loop)
        return self

    @model_validator(mode="after")
    def _scope_needs_a_key(self) -> ServerSettings:
        # Asking to protect /metrics or health without a key would leave them open while looking protected.
        if (self.api_key_metrics or self.api_key_health) and self.api_key is None:
            raise ValueError("api_key_metrics / api_key_health protect routes with api_key; set DEEBERT_API_KEY too")
        return self

    @model_validator(mode="after")
    def _targets_fit_together(self) -> ServerSettings:
        if self.target_p99_ms is not None and self.brownout_queue_wait_ms is not None:
            raise ValueError(
                "target_p99_ms and brownout_queue_wait_ms both lower the default under load; set one "
                "(the latency target moves it in steps and back, brownout switches it on and off)"
            )
        if (self.target_agreement is not None or self.agreement_floor is not None) and self.shadow_fraction == 0:
            raise ValueError("agreement is measured by shadow sampling; shadow_fraction must be > 0 for it")
        if self.agreement_floor is not None and self.target_p99_ms is None:
            raise ValueError("agreement_floor bounds the latency target; set target_p99_ms too")
        if (
            self.agreement_floor is not None
            and self.target_agreement is not None
            and self.agreement_floor > self.target_agreement
        ):
            raise ValueError("agreement_floor is how far latency may lower agreement: at most target_agreement")
        return self

    @property
    def effective_shadow_fraction(self) -> float:
        """The shadow fraction in force: as set, else on at AGREEMENT_SHADOW_FRACTION for an agreement target."""
        if self.shadow_fraction is not None:
            return self.shadow_fraction
        measured = self.target_agreement is not None or self.agreement_floor is not None
        return AGREEMENT_SHADOW_FRACTION if measured else 0.0
