# pgttt for GPU pods: `pgttt serve` on checkpoints and data mounted as volumes.
#
#   docker build -t pgttt .
#   docker run --gpus all -p 8000:8000 -v $PWD/runs:/checkpoints -v $PWD/data:/data pgttt
#
# The base image's CUDA torch is kept: the install pins torch to the version already in the image.
FROM pytorch/pytorch:2.9.0-cuda12.8-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# lrzip decodes the 2026-04-27 record's per-group (PGRP) artifacts. Not pinned (DL3008): the base
# image's Ubuntu release decides which version its archive holds, and any 0.6x decodes these files.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends lrzip \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/pgttt
COPY pyproject.toml README.md ./
COPY cli ./cli
COPY checkpoints ./checkpoints
COPY ttt ./ttt
COPY budget ./budget
COPY api ./api
COPY app ./app
COPY client ./client
COPY training ./training

# A local path, not a registry package: there is no version to pin (DL3013 does not apply).
# hadolint ignore=DL3013
RUN python -c "import torch; print('torch==' + torch.__version__)" > /tmp/keep-torch.txt \
 && pip install --constraint /tmp/keep-torch.txt . \
 && rm /tmp/keep-torch.txt \
 && useradd --create-home --uid 1000 --user-group --shell /usr/sbin/nologin pgttt \
 && mkdir -p /checkpoints /data /var/lib/pgttt \
 && chown pgttt:pgttt /checkpoints /data /var/lib/pgttt

# Every setting of `pgttt serve` is a PGTTT_* variable; these are the image's defaults.
ENV PGTTT_CHECKPOINT_DIRS=/checkpoints \
    PGTTT_DATA_DIRS=/data \
    PGTTT_STATE_DIR=/var/lib/pgttt \
    PGTTT_DEVICES=cuda \
    PGTTT_HOST=0.0.0.0 \
    PGTTT_PORT=8000 \
    PGTTT_QUEUE_LIMIT=256 \
    PGTTT_WARMUP=true \
    PGTTT_LOG_LEVEL=info

# Compiled kernels kept on the state volume: a new container's warm-up reuses them instead of compiling
# again (on a CPU, the demo's warm-up took 92 s cold and 11 s from the cache; see docs/service.md).
ENV TORCHINDUCTOR_CACHE_DIR=/var/lib/pgttt/compile-cache/inductor \
    TRITON_CACHE_DIR=/var/lib/pgttt/compile-cache/triton

VOLUME ["/checkpoints", "/data", "/var/lib/pgttt"]
EXPOSE 8000
USER 1000:1000

HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PGTTT_PORT', '8000'), timeout=4)"]

ENTRYPOINT ["pgttt", "serve"]
