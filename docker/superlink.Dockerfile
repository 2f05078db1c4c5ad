# Edge server image: Flower's official SuperLink 1.39 (amd64 + arm64) plus this app, because
# the SuperLink runs the ServerApp (evaluation needs torch/transformers) in a subprocess.
# Build from the repository root:
#   docker buildx build --platform linux/amd64,linux/arm64 -f docker/superlink.Dockerfile -t edge-lam-superlink .
ARG FLWR_IMAGE=flwr/superlink:1.39.0
FROM ${FLWR_IMAGE}

ARG TARGETARCH
USER root
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends bash openssl openssh-client \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY edge_lam edge_lam
COPY strategies strategies
COPY client_app client_app
COPY server_app server_app
COPY deploy deploy
# torch first, as pyproject.toml's markers want it: amd64 the CPU build (PyPI's default pulls
# CUDA); arm64 PyPI's 2.9.1, CPU-only (2.11+ aarch64 wheels are CUDA builds, 2.10's dies with
# SIGILL on a Pi 4's Cortex-A72).
RUN if [ "$TARGETARCH" = "amd64" ]; then \
      python -m pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu; \
    else python -m pip install --no-cache-dir torch==2.9.1; fi \
    && python -m pip install --no-cache-dir . \
    && chown -R app:app /app
USER app
ENV HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
EXPOSE 9092 9093
# Same entry point and flags as bare metal: deploy/superlink.sh is the one source of truth.
ENTRYPOINT ["/app/deploy/superlink.sh"]
CMD ["--certs", "/certs", "--state", "/state", "--fleet", "0.0.0.0:9092", "--control", "0.0.0.0:9093"]
