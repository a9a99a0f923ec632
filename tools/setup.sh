#!/usr/bin/env bash
# Set up (or check) the project's environment in .venv: Debian packages for FFCV, the pinned torch, the locked
# Python packages, DALI, FFCV, and the project itself (editable). Idempotent: a second run finds the stamp of
# an identical set-up and installs nothing. Where the Debian packages cannot be installed (not root, no sudo),
# it finishes without FFCV and says so in one line; every other path keeps working.
#
# Options (the container image uses both; see Dockerfile):
#   --deps-only  everything but the project itself, and no stamp: the image installs the dependencies in a layer
#                built from requirements/ alone, so a code change does not reinstall torch
#   --cupy       install cupy even where nvidia-smi is absent (images are built without a GPU)
set -euo pipefail
cd "$(dirname "$0")/.."
deps_only=0
cupy=0
for arg in "$@"; do
  case "$arg" in
    --deps-only) deps_only=1 ;;
    --cupy) cupy=1 ;;
    *) echo "setup: unknown option '$arg' (options: --deps-only, --cupy)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
VENV=.venv
if [ "$deps_only" = 0 ]; then
  stamp_key=$(cat tools/setup.sh pyproject.toml requirements/lock.txt requirements/lock-ffcv.txt | sha256sum | cut -c1-16)
  stamp="$VENV/.setup-$stamp_key"
  if [ -f "$stamp" ]; then
    exit 0
  fi
fi

debian_packages=(pkg-config g++ libopencv-dev libturbojpeg0-dev)
with_ffcv=1
missing=()
for p in "${debian_packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO=none; fi
  if [ "$SUDO" = none ]; then
    with_ffcv=0
  else
    echo "setup: installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null 2>&1 \
      || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null; } \
      || with_ffcv=0
  fi
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
# torch first and exactly pinned: FFCV's metadata asks for an unpinned torch.
"${pip[@]}" "torch==2.14.1" "torchvision==0.29.1"
"${pip[@]}" -r requirements/lock.txt
[ "$deps_only" = 1 ] || "${pip[@]}" --no-deps -e .
ffcv_hint="add it later: sudo apt-get install ${debian_packages[*]} && .venv/bin/pip install --no-deps -r requirements/lock-ffcv.txt"
if [ "$with_ffcv" = 1 ]; then
  # --no-deps: FFCV would pull opencv-python (needs libGL), torch and numba unpinned; lock-ffcv.txt pins what it
  # resolved, with the headless OpenCV build. A failed build leaves every other loader working.
  if ! "${pip[@]}" --no-deps -r requirements/lock-ffcv.txt >/tmp/divnorm-ffcv-install.log 2>&1 \
    || ! "$VENV/bin/python" -c "import ffcv" >>/tmp/divnorm-ffcv-install.log 2>&1; then
    echo "setup: FFCV skipped (its build or import failed, see /tmp/divnorm-ffcv-install.log); every other loader works; $ffcv_hint"
  fi
else
  echo "setup: FFCV skipped (needs Debian packages ${debian_packages[*]} and root to install them); every other loader works; $ffcv_hint"
fi
if [ "$cupy" = 1 ] || { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; }; then
  # GPU machine: cupy lets FFCV normalize on the GPU (the `gpu` extra); without it the loader uses torch ops.
  "${pip[@]}" "cupy-cuda13x" || echo "setup: cupy not installed; FFCV normalizes with torch ops on the GPU"
fi
if [ "$deps_only" = 1 ]; then
  echo "setup: dependencies ready in $VENV (--deps-only: the project itself is not installed)"
  exit 0
fi
rm -f "$VENV"/.setup-*
touch "$stamp"
echo "setup: .venv ready ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
