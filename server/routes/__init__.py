"""The HTTP routes, one module per group; each module's `router` is included by `server.app.create_app`.

classify     POST /v1/classify: our API, with early-exit fields
tei          POST /predict: text-embeddings-inference's request and response shape
model_info   GET /v1/model
health       GET /health/live, /health/ready, /metrics
"""
