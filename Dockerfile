# divnorm-trainer: CUDA PyTorch + DALI + FFCV + this project, for `docker run --gpus all --ipc=host IMAGE python -m train ...`
#
# Not built on the development machine (no Docker engine there); every path and command below was checked by
# reading against tools/setup.sh, pyproject.toml and requirements/. The base tag pairs torch 2.14.1 with CUDA 13.0;
# if that tag is not published, use the closest pytorch/pytorch:<2.14.x>-cuda13.0-cudnn9-runtime tag: the pinned
# torch==2.14.1 below then replaces the base image's torch (same CUDA 13 wheels as requirements/lock.txt).
ARG BASE_IMAGE=pytorch/pytorch:2.14.1-cuda13.0-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

# Debian libraries FFCV compiles and links against (the same list as tools/setup.sh)
RUN apt-get update \
 && apt-get install -y --no-install-recommends pkg-config g++ libopencv-dev libturbojpeg0-dev \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/divnorm-trainer

# dependency layers first (cached while only the code changes); the order follows tools/setup.sh:
# torch pinned first (FFCV's metadata asks for an unpinned torch), then the lock file (DALI, CUDA libs, numba, ...),
# then FFCV without its unpinned dependencies, then cupy so FFCV can normalize on the GPU
COPY requirements/ requirements/
RUN python -m pip install "torch==2.14.1" "torchvision==0.29.1" \
 && python -m pip install -r requirements/lock.txt \
 && python -m pip install --no-deps -r requirements/lock-ffcv.txt \
 && python -m pip install "cupy-cuda13x" \
 && python -c "import ffcv, nvidia.dali, cupy, torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# the project, editable as tools/setup.sh does it: train/config.py finds configs/ beside the package, and
# benchmarks/<machine>/tuned.json is read from the tree (dependencies are installed above: --no-deps)
COPY pyproject.toml README.md ./
COPY divnorm/ divnorm/
COPY models/ models/
COPY loaders/ loaders/
COPY train/ train/
COPY tools/ tools/
COPY configs/ configs/
COPY benchmarks/ benchmarks/
COPY examples/ examples/
RUN python -m pip install --no-deps -e . \
 && python -c "import train, models, loaders, divnorm"

# run folders and data sets live on mounted volumes: -v /data:/data -v $PWD/runs:/opt/divnorm-trainer/runs
VOLUME ["/data", "/opt/divnorm-trainer/runs"]
CMD ["python", "-m", "train", "--help"]
