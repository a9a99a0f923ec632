# divnorm-trainer: PyTorch (CUDA 13 wheels) + DALI + FFCV + this project, for
# `docker run --gpus all --ipc=host IMAGE python -m train ...` (see docs/container.md).
#
# BASE_IMAGE: the CUDA PyTorch image by default (GPU hosts with Docker; this tag has not been pulled or verified
# here: if it is not published, use the closest pytorch/pytorch:<2.14.x>-cuda13.0-cudnn9-runtime tag; the pinned
# torch 2.14.1 is installed into the image's venv either way). Any Debian / Ubuntu base with nothing but its OS
# works too: the first step installs Python, venv and headers when the base has none. tools/container.sh builds
# it that way with buildah from a local debootstrapped Debian bookworm (built and run on CPU there).
#
# Layers, ordered so a code change reuses the dependency layer (torch, CUDA libraries, DALI, FFCV):
#   1. the OS's Python >= 3.10 with venv and headers (FFCV compiles a C extension)
#   2. tools/setup.sh --deps-only from tools/setup.sh + requirements/ alone: FFCV's Debian libraries, the venv,
#      torch pinned first, requirements/lock.txt, FFCV (--no-deps), cupy
#   3. the project (tools/setup.sh again: everything is satisfied, it installs the project editable)
# Every RUN that installs Python packages reads /run/divnorm-pip/env.sh when the builder mounts one
# (tools/container.sh does: the host's pip indexes, wheel folders, constraints and CA bundle, read-only);
# with plain `docker build` nothing is mounted and pip uses PyPI.
ARG BASE_IMAGE=pytorch/pytorch:2.14.1-cuda13.0-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/divnorm-trainer/.venv \
    PATH=/opt/divnorm-trainer/.venv/bin:${PATH}

WORKDIR /opt/divnorm-trainer

# 1. Python: the CUDA PyTorch base has one (conda's, with headers); a bare Debian / Ubuntu base gets the OS's
RUN if ! python3 -c "import ensurepip, venv, sysconfig, os, sys; \
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h')))" 2>/dev/null; then \
      echo "installing the OS's python3, python3-venv, python3-dev, ca-certificates (apt-get)" \
      && apt-get update -qq \
      && apt-get install -y -qq --no-install-recommends python3 python3-venv python3-dev ca-certificates >/dev/null \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
 && python3 -c "import sys; v = sys.version_info; sys.exit(0 if v >= (3, 10) else \
'error: the base image has Python %d.%d; divnorm-trainer needs >= 3.10: use a newer BASE_IMAGE \
(Debian bookworm, Ubuntu 22.04 or later)' % v[:2])"

# 2. dependencies, exactly as tools/setup.sh installs them (its Debian packages, then pip, in its order); the
# import check makes a failed FFCV or DALI install fail the build (setup.sh alone only warns)
COPY tools/setup.sh tools/setup.sh
COPY requirements/ requirements/
RUN if [ -f /run/divnorm-pip/env.sh ]; then . /run/divnorm-pip/env.sh; fi \
 && bash tools/setup.sh --deps-only --cupy \
 && rm -rf /var/lib/apt/lists/* \
 && { python -c "import ffcv" || { cat /tmp/divnorm-ffcv-install.log; exit 1; }; } \
 && rm -f /tmp/divnorm-ffcv-install.log \
 && python -c "import ffcv, nvidia.dali, cupy, torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# 3. the project, editable as tools/setup.sh installs it: train/config.py finds configs/ beside the package, and
# benchmarks/<machine>/tuned.json is read from the tree (.dockerignore keeps .venv, runs, data, .git out)
COPY . .
RUN if [ -f /run/divnorm-pip/env.sh ]; then . /run/divnorm-pip/env.sh; fi \
 && bash tools/setup.sh \
 && python -c "import train, models, loaders, divnorm"

# run folders and data sets live on mounted volumes: -v /data:/data -v $PWD/runs:/opt/divnorm-trainer/runs
VOLUME ["/data", "/opt/divnorm-trainer/runs"]
CMD ["python", "-m", "train", "--help"]
