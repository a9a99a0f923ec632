#!/usr/bin/env bash
# Stage NVIDIA DALI for the offline GPU machine in fewer transfers than ../shared/gpu/stage-dali-wheels.sh (5 parts
# of 56 MiB): the same wheels (DALI 2.4.0 for CUDA 13 + its dependencies, Python 3.12), unpacked into one
# site-packages tree, trimmed of what a Python 3.12 process never loads (DALI's extension for the other Pythons,
# C++ headers, nvCOMP's command-line tools), packed as one xz tar (~190 MB instead of 257 MB) and split into
# .gpudali/part-NN: part-00 is FIRST_MIB (default 24) so it fits beside .gpuffcv + .gpudata in one call, the others
# PART_MIB (default 60). Carry one part per call (`.gpudali/part-NN`) and copy it out of the checkout on arrival
# (`cp .gpudali/part-* /tmp/dali-parts/`: a carried path is gone again at the next call that carries another); once
# every part is there (benchmarks/gpu/device_session.sh does this, and lists the calls):
#   mkdir -p .gpusite && cat /tmp/dali-parts/part-* | xz -d | tar -x -C .gpusite && export PYTHONPATH=$PWD/.gpusite
# Reuses .gpuwheels/part-* when the shared script already downloaded them. Run from the project root.
set -euo pipefail
first=${FIRST_MIB:-24}
size=${PART_MIB:-60}
dir=.gpudali
for ignore in "/$dir/" "/.gpusite/"; do grep -qx "$ignore" .git/info/exclude 2>/dev/null || echo "$ignore" >>.git/info/exclude; done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/wheels" "$work/site"
if ls .gpuwheels/part-* >/dev/null 2>&1; then
  cat .gpuwheels/part-* | tar -x -C "$work/wheels"
else
  python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$work/wheels" "nvidia-dali-cuda130==${DALI_VERSION:-2.4.0}"
  # already on the GPU machine
  rm -f "$work"/wheels/{numpy,packaging,PyYAML,pyyaml,typing_extensions,wheel}-*
fi
for wheel in "$work"/wheels/*.whl; do python3 -m zipfile -e "$wheel" "$work/site"; done
find "$work/site/nvidia/dali" -maxdepth 1 -name 'backend_impl.cpython-*.so' ! -name '*cpython-312-*' -delete
rm -rf "$work/site/nvidia/dali/include" "$work/site/nvidia/libnvcomp/bin"
rm -rf "$dir"; mkdir -p "$dir"
tar -C "$work/site" -cf - . | xz -T0 -6 >"$work/site.tar.xz"
head -c "$((first * 1048576))" "$work/site.tar.xz" >"$dir/part-00"
tail -c "+$((first * 1048576 + 1))" "$work/site.tar.xz" | split -b "${size}m" -d --numeric-suffixes=1 - "$dir/part-"
ls -l "$dir"
echo "$(ls "$dir" | wc -l) parts, $(du -sh "$work/site" | cut -f1) unpacked"
