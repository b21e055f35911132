# deebert inference server. CPU by default:
#   docker build -t deebert .
# CUDA: docker build --build-arg BASE_IMAGE=nvidia/cuda:12.4.1-runtime-ubuntu22.04 --build-arg TORCH_SPEC="torch" -t deebert:cuda .
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX=""
# PIP_BREAK_SYSTEM_PACKAGES: a base whose Python is the distribution's (Debian, Ubuntu CUDA images) refuses
# system-wide pip installs without it (PEP 668); an image holds one application, so that is where it goes.
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 HF_HUB_OFFLINE=1 DEEBERT_CHECKPOINT=/app/weights/sst2-minilm-l6

# jemalloc keeps the server's resident memory flat under sustained load (`deebert serve` preloads it when
# installed: DEEBERT_ALLOCATOR=auto); CUDA base images also come without Python, python:3.11-slim has it.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libjemalloc2 \
    && if ! command -v python3 >/dev/null; then \
         apt-get install -y --no-install-recommends python3 python3-pip python-is-python3 curl; \
       fi \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# torch first, so the project's loose `torch>=` requirement is already met (CPU build unless told otherwise).
RUN python3 -m pip install ${TORCH_INDEX:+--index-url ${TORCH_INDEX}} "${TORCH_SPEC}"
COPY pyproject.toml README.md ./
COPY deebert ./deebert
COPY model ./model
COPY reports ./reports
COPY server ./server
COPY loadtest ./loadtest
RUN python3 -m pip install .
COPY weights ./weights

RUN useradd --system --uid 10001 --home /app deebert && chown -R deebert /app
USER deebert
# The ONNX Runtime graphs of the shipped checkpoint, exported at build time so a container starts without
# exporting (another checkpoint is exported on its first start into the same cache).
ENV DEEBERT_CACHE_DIR=/app/.cache/deebert
RUN deebert export --checkpoint /app/weights/sst2-minilm-l6 > /dev/null
EXPOSE 8000
# start-period: loading, plus the bounded runtime tune of a first start (DEEBERT_TUNE_BUDGET_S, 120 s).
HEALTHCHECK --interval=10s --timeout=3s --start-period=240s --retries=3 \
  CMD python3 -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health/ready', timeout=2).status == 200 else 1)"
CMD ["deebert", "serve", "--host", "0.0.0.0"]
