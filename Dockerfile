# Training image for GPU clusters (and CPU boxes). PyPI's Linux torch wheel bundles its
# CUDA libraries, so a slim Python base is enough; the host needs an NVIDIA driver and
# the container toolkit (docker run --gpus all ...).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends git build-essential libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/jpdse
COPY requirements.txt requirements-dev.txt ./
RUN pip install "torch==2.13.0" && pip install -r requirements.txt
COPY . .

# Data, shards, runs and the torch hub cache (VGG19 / Inception weights) are mounted:
#   docker run --gpus all -v /data:/data -v $HOME/.cache/torch:/root/.cache/torch IMAGE \
#     torchrun --nproc_per_node=8 -m pipeline train --config configs/default.yaml data.root=/data/cityscapes
ENTRYPOINT []
CMD ["python", "-m", "pipeline", "--help"]
