"""The HTTP routes, one module per group; each module's `router` is included by `server.app.create_app`.

classify     POST /v1/classify: our API, with early-exit fields
tei          text-embeddings-inference's API: POST /, /predict, /invocations; GET /info, /health, /ping
model_info   GET /v1/model
health       GET /health/live, /health/ready, /metrics
direct       the lane that answers classify's and TEI's well-formed POSTs before FastAPI, through their `respond`
"""
