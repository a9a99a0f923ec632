#!/usr/bin/env bash
# Build and check the project's container image without Docker: buildah (no daemon), vfs storage, chroot isolation.
#
#   bash tools/container.sh base    a local Debian bookworm base image (debootstrap --variant=minbase + podman import),
#                                   for machines that cannot pull one
#   bash tools/container.sh build   the image from the Dockerfile on that base (buildah bud --layers), with the host's
#                                   pip configuration and CA bundle mounted read-only (tools/container_pip.py)
#   bash tools/container.sh smoke   inside the image: the default job, `import nvidia.dali, ffcv`,
#                                   tools/benchmark.py --list, tests/test_divnorm.py; prints the image size
#   bash tools/container.sh clean   removes the smoke container, both images and their cached layers
#
# Each step is idempotent (base: kept if present; build: unchanged layers are reused; smoke: a fresh container).
# Environment: DIVNORM_IMAGE (default localhost/divnorm-trainer:latest), DIVNORM_BASE_IMAGE (default
# localhost/divnorm-base:bookworm; any pulled Debian/Ubuntu image works), DEBIAN_MIRROR (default
# http://deb.debian.org/debian), DIVNORM_STORAGE_DRIVER (default: containers/storage picks one: overlay where the
# kernel allows it, else vfs, and whatever an existing store already uses). Images live in buildah's default store
# (/var/lib/containers/storage as root); see docs/container.md. On vfs every build step is a full copy of the
# image (about 10 GB each here): a first build then needs 60+ GB free, against under 10 GB on overlay.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${DIVNORM_IMAGE:-localhost/divnorm-trainer:latest}
BASE=${DIVNORM_BASE_IMAGE:-localhost/divnorm-base:bookworm}
SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
# empty: let containers/storage choose (overlay if it works here, else vfs; an existing store keeps its driver)
DRIVER_ARGS=()
[ -z "${DIVNORM_STORAGE_DRIVER:-}" ] || DRIVER_ARGS=(--storage-driver "$DIVNORM_STORAGE_DRIVER")
SMOKE_CTR=divnorm-smoke

say() { echo "container: $*"; }
die() { echo "container: error: $*" >&2; exit 1; }
# one line naming every missing tool and the command that installs them
need() {
  local missing=() t
  for t in "$@"; do command -v "$t" >/dev/null 2>&1 || missing+=("$t"); done
  if [ ${#missing[@]} -gt 0 ]; then
    die "missing ${missing[*]}: install with: apt-get update && apt-get install -y ${missing[*]} (as root)"
  fi
}
buildah_() { buildah "${DRIVER_ARGS[@]}" "$@"; }
image_exists() { buildah_ inspect --type image "$1" >/dev/null 2>&1; }
image_size() { buildah_ images --format '{{.Size}}' "$1" 2>/dev/null | head -n 1; }
store_root() { buildah_ info --format '{{.store.GraphRoot}}' 2>/dev/null || echo /var/lib/containers/storage; }
store() { echo "$(store_root), $(buildah_ info --format '{{.store.GraphDriverName}}' 2>/dev/null) driver"; }

step_base() {
  need buildah podman debootstrap
  if image_exists "$BASE"; then
    say "base: $BASE already exists ($(image_size "$BASE")); nothing to do (bash tools/container.sh clean removes it)"
    return
  fi
  [ "$(id -u)" = 0 ] || die "debootstrap needs root: run as root (or set DIVNORM_BASE_IMAGE to an image you have)"
  local tmp
  tmp=$(mktemp -d "${TMPDIR:-/var/tmp}/divnorm-base.XXXXXX")
  # --one-file-system: never follow a /proc or /sys that a failed debootstrap left mounted in the rootfs
  trap "rm -rf --one-file-system '$tmp'" EXIT
  say "base: debootstrap --variant=minbase $SUITE from $MIRROR into $tmp (about a minute)"
  if ! debootstrap --variant=minbase "$SUITE" "$tmp/rootfs" "$MIRROR" >"$tmp/debootstrap.log" 2>&1; then
    tail -n 20 "$tmp/debootstrap.log" >&2
    die "debootstrap failed (log above); check that $MIRROR is reachable (DEBIAN_MIRROR=... picks another)"
  fi
  rm -rf "$tmp/rootfs/var/cache/apt/archives/"*.deb "$tmp/rootfs/var/lib/apt/lists/"*
  say "base: importing the root file system as $BASE (podman import; store: $(store))"
  tar -C "$tmp/rootfs" -c . \
    | podman "${DRIVER_ARGS[@]}" import --quiet --change 'CMD ["/bin/bash"]' - "$BASE" >/dev/null
  say "base: $BASE ready ($(image_size "$BASE"))"
}

step_build() {
  need buildah python3
  image_exists "$BASE" || die "no base image $BASE: run bash tools/container.sh base first (or set DIVNORM_BASE_IMAGE)"
  local tmp mounts=() m
  tmp=$(mktemp -d "${TMPDIR:-/var/tmp}/divnorm-pip.XXXXXX")
  trap "rm -rf '$tmp'" EXIT
  say "build: passing the host's pip configuration and CA bundle into the build (read-only):"
  python3 tools/container_pip.py "$tmp"
  while IFS= read -r m; do mounts+=(-v "$m"); done <"$tmp/mounts"
  say "build: buildah bud --layers $IMAGE from $BASE (unchanged layers are reused; a first build installs torch,"
  say "       the CUDA libraries, DALI and FFCV: 8-10 minutes on the 2-core build machine, ~10 GB)"
  # pip warns once per package that a local index lacks (harmless: it then looks in the next index); dropped here
  buildah_ bud --layers --isolation chroot --pull=never --build-arg BASE_IMAGE="$BASE" "${mounts[@]}" \
    -t "$IMAGE" -f Dockerfile . 2>&1 | grep -v "^WARNING: Location 'file://.*' is ignored: it is neither a file"
  say "build: $IMAGE ready ($(image_size "$IMAGE"); store: $(store))"
}

step_smoke() {
  need buildah
  image_exists "$IMAGE" || die "no image $IMAGE: run bash tools/container.sh build first"
  # a fresh container each time: a leftover one (an interrupted smoke) is removed first
  buildah_ rm "$SMOKE_CTR" >/dev/null 2>&1 || true
  say "smoke: creating container $SMOKE_CTR from $IMAGE"
  buildah_ from --pull=never --name "$SMOKE_CTR" "$IMAGE" >/dev/null
  trap 'buildah_ rm "$SMOKE_CTR" >/dev/null 2>&1 || true' EXIT
  inside() { buildah_ run --isolation chroot "$SMOKE_CTR" -- "$@"; }

  say "smoke: [1/4] the default job inside the image: python -m train (CPU; about 1-2 minutes)"
  inside python -m train
  say "smoke:       checking runs/default/summary.json"
  inside python -c "
import json, math, sys
s = json.load(open('runs/default/summary.json'))
top1 = (s.get('test') or {}).get('top1', math.nan)
# 100 classes: chance is 1 %; the job reaches ~98 % on this machine
if not (isinstance(top1, (int, float)) and math.isfinite(top1) and top1 > 10):
    sys.exit(f'container: error: default job summary has test top-1 {top1!r} (expected > 10 %)')
print(f'container: smoke: default job test top-1 {top1:.2f}% (inside the image)')
"
  say "smoke: [2/4] import nvidia.dali, ffcv"
  inside python -c "
import ffcv, nvidia.dali, torch
print('container: smoke: torch', torch.__version__, '| DALI', nvidia.dali.__version__, '| FFCV', ffcv.__version__)
"
  say "smoke: [3/4] python tools/benchmark.py --dataset synthetic --list (the settings it would measure)"
  inside python tools/benchmark.py --dataset synthetic --list
  say "smoke: [4/4] python -m pytest tests/test_divnorm.py"
  inside python -m pytest tests/test_divnorm.py -q -p no:cacheprovider
  say "smoke: passed; image $IMAGE is $(image_size "$IMAGE") (store: $(store))"
}

step_clean() {
  need buildah
  say "clean: removing container $SMOKE_CTR and images $IMAGE, $BASE from $(store)"
  buildah_ rm "$SMOKE_CTR" >/dev/null 2>&1 || true
  local i
  for i in "$IMAGE" "$BASE"; do
    if image_exists "$i"; then buildah_ rmi "$i" >/dev/null; fi
  done
  # the cached intermediate layers of `build --layers` are untagged images once the tagged one is gone
  say "clean: pruning untagged images (the cached build layers)"
  buildah_ rmi --prune >/dev/null 2>&1 || true
  say "clean: done; $(store_root) now holds $(du -sh "$(store_root)" 2>/dev/null | cut -f1)"
}

case "${1:-}" in
  base) step_base ;;
  build) step_build ;;
  smoke) step_smoke ;;
  clean) step_clean ;;
  *) die "usage: bash tools/container.sh base|build|smoke|clean (see the top of tools/container.sh)" ;;
esac
