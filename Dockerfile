# Training image for GPU clusters (and CPU boxes).
#
#   docker build -t jpdse .                      # lint first: hadolint Dockerfile
#   docker run --gpus all --shm-size=16g \
#     -v /data:/data -v /runs:/opt/jpdse/runs -v $HOME/.cache/torch:/home/jpdse/.cache/torch \
#     jpdse torchrun --nproc_per_node=8 -m pipeline train --config configs/default.yaml data.root=/data/cityscapes
#
# Base: a CUDA PyTorch image (BASE_IMAGE); the install steps are the README's (`make install`): torch
# pinned first, then the requirements, then the project itself, without its dependencies. The host
# needs an NVIDIA driver and the container toolkit (--gpus all). On a CPU box pass
# --build-arg BASE_IMAGE=python:3.11-slim: the same steps install the CPU torch wheel there.
#
# The bpg codec: the image holds no BPG binaries (not redistributed here). Mount a folder holding
# `bpgenc` and `bpgdec` on /opt/bpg/bin, which is on PATH:
#   docker run ... -v /path/to/libbpg/bin:/opt/bpg/bin:ro jpdse python -m pipeline shards ...
# Without them every codec but `bpg` works, `hevc` (BPG's core, in-process) included.
#
# Data, shards, runs, the MLflow store (or tracking.uri=http://server:5000) and the torch hub cache
# (VGG19 / Inception weights, never downloaded by the pipeline) are mounted; the image runs as the
# unprivileged user jpdse (uid 1000: mount folders it may write, or pass --user).
ARG BASE_IMAGE=pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    PATH=/opt/bpg/bin:$PATH
# git (run tags), a compiler (DeepSpeed's ops), glib (OpenCV); versions are the base image's release's
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends git build-essential libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/jpdse
COPY requirements.txt requirements-dev.txt ./
RUN python -m pip install "torch==2.13.0" \
    && python -m pip install -r requirements.txt
COPY . .
RUN python -m pip install --no-deps --no-build-isolation -e . \
    && useradd --create-home --uid 1000 --shell /bin/bash jpdse \
    && mkdir -p /opt/bpg/bin /opt/jpdse/runs /home/jpdse/.cache/torch \
    && chown -R jpdse:jpdse /opt/jpdse/runs /home/jpdse/.cache

USER 1000:1000
ENTRYPOINT []
CMD ["python", "-m", "pipeline", "--help"]
