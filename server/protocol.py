"""The wire protocol's names, spelled once: route paths and headers, for the routes, the middleware and the load
tool alike. Constants only; importing this module imports nothing else."""

from __future__ import annotations

# --- routes ----------------------------------------------------------------------------------------
CLASSIFY_PATH = "/v1/classify"
MODEL_PATH = "/v1/model"
LIVE_PATH = "/health/live"
READY_PATH = "/health/ready"
METRICS_PATH = "/metrics"
# text-embeddings-inference's routes (`/invocations` and `/ping` are SageMaker's).
TEI_PREDICT_PATHS = ("/predict", "/", "/invocations")
TEI_INFO_PATH = "/info"
TEI_HEALTH_PATHS = ("/health", "/", "/ping")
# POSTs to these run the model.
INFERENCE_PATHS = frozenset({CLASSIFY_PATH, *TEI_PREDICT_PATHS})

# --- request headers -------------------------------------------------------------------------------
THRESHOLD_HEADER = "X-Exit-Threshold"

# --- response headers ------------------------------------------------------------------------------
EXIT_LAYER_HEADER = "X-Exit-Layer"  # the deepest exit layer among the request's texts (1..n)
LAYERS_EXECUTED_HEADER = "X-Layers-Executed"  # Σ exit layer over the request's texts
DEGRADED_HEADER = "X-Exit-Degraded"  # "true" when brownout answered at a cheaper threshold
TOKENIZATION_TIME_HEADER = "X-Tokenization-Time"  # ms
QUEUE_TIME_HEADER = "X-Queue-Time"  # ms
COMPUTE_TIME_HEADER = "X-Compute-Time"  # ms
TOTAL_TIME_HEADER = "X-Total-Time"  # ms
