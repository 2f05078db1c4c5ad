# Device image: Flower's official SuperNode 1.39 (amd64 + arm64: laptops, Raspberry Pi 4/5)
# plus this app, which the SuperNode runs as its ClientApp. For a Jetson, build with a JetPack
# base that already holds NVIDIA's torch and Python >= 3.11 (see docker/README.md).
# Build from the repository root:
#   docker buildx build --platform linux/amd64,linux/arm64 -f docker/supernode.Dockerfile -t edge-lam-supernode .
ARG FLWR_IMAGE=flwr/supernode:1.39.0
FROM ${FLWR_IMAGE}

ARG TARGETARCH
ARG INSTALL_TORCH=1
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
# CUDA); arm64 PyPI's 2.9.1, CPU-only (2.10's aarch64 wheel dies with SIGILL on a Pi 4's
# Cortex-A72, 2.11+ are CUDA builds). docker/build-oci.sh builds the same image without Docker.
RUN if [ "$INSTALL_TORCH" = "1" ]; then \
      if [ "$TARGETARCH" = "amd64" ]; then \
        python -m pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu; \
      else python -m pip install --no-cache-dir torch==2.9.1; fi; \
    fi \
    && python -m pip install --no-cache-dir . \
    && chown -R app:app /app
USER app
ENV HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
# Same entry point and flags as bare metal: deploy/supernode.sh is the one source of truth.
ENTRYPOINT ["/app/deploy/supernode.sh"]
