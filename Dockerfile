# The inference service. Two images from one file:
#   podman build -t inference .                                 embedded model (llama.cpp + SmolLM2 baked in)
#   podman build -t inference-upstream --build-arg BACKEND=openai .   gateway to an OpenAI-compatible upstream
# The runtime stage has no compilers, runs as UID 10001 and writes nothing outside /tmp, so it runs with a
# read-only root filesystem and every capability dropped. scripts/image_test.py builds and runs it for real.

# ---- build: compile the wheels into a venv, fetch and verify the default model -------------------------------
FROM debian:bookworm-slim AS build
ARG BACKEND=llama

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Debian stable replaces package versions in place with each point release and security update, so pinned apt
# versions would break the build at the next update; the base tag already fixes the release (bookworm).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc g++ make cmake \
 && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv "$VIRTUAL_ENV"
WORKDIR /src

# Dependencies first: this layer (with llama-cpp-python's ~5-minute compile) is rebuilt only when the packaging
# metadata changes, and pip's cache mount lets even that rebuild reuse the compiled wheel. llama.cpp is built for
# a CPU family, not for the build machine (GGML_NATIVE=OFF: AVX2/FMA/F16C on x86-64), so the image runs on any
# node of the cluster; the cache is kept per LLAMA_CMAKE_ARGS so other flags never reuse a wheel built without them.
# DL3013: the versions are the package's own requirements in setup.cfg (llama-cpp-python pinned exactly there).
ARG LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF"
COPY setup.cfg pyproject.toml ./
COPY inference/__init__.py inference/
# hadolint ignore=DL3013
RUN --mount=type=cache,target=/root/.cache/pip \
    case "$BACKEND" in \
      llama) extras=llama ;; \
      openai) extras=upstream ;; \
      *) echo "BACKEND must be llama or openai, not '$BACKEND'" >&2; exit 1 ;; \
    esac \
 && PIP_CACHE_DIR="/root/.cache/pip/$(echo "$LLAMA_CMAKE_ARGS" | sha256sum | cut -c1-12)" \
    CMAKE_ARGS="$LLAMA_CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" pip install ".[$extras]"

COPY README.md ./
COPY inference/ inference/
RUN pip install --no-cache-dir --no-deps --force-reinstall . && python -m inference --help >/dev/null

# The default model is part of the image: a pod starts without network access and without a download.
ENV MODEL_CACHE_DIR=/opt/models
RUN mkdir -p "$MODEL_CACHE_DIR" && if [ "$BACKEND" = llama ]; then python -m inference pull; fi

# ---- runtime ----------------------------------------------------------------------------------------------------
FROM debian:bookworm-slim AS runtime
ARG BACKEND=llama
LABEL org.opencontainers.image.title="inference" \
      org.opencontainers.image.description="HTTP inference service for GGUF models: OpenAI API, caching, rate limits, telemetry" \
      org.opencontainers.image.licenses="Apache-2.0"

# python3 for the venv's interpreter; libgomp1 for llama.cpp's OpenMP threads. (Same reason as above for DL3008.)
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --gid 0 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin inference

COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/models /opt/models

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOST=0.0.0.0 \
    PORT=8000 \
    MODEL_BACKEND=$BACKEND \
    MODEL_CACHE_DIR=/opt/models \
    XDG_CACHE_HOME=/tmp/.cache \
    ENVIRONMENT=production \
    LOG_FORMAT=json

USER 10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 CMD ["python", "-m", "inference", "healthcheck"]
CMD ["python", "-m", "inference"]
