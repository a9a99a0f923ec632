#!/usr/bin/env bash
# Check, on this CPU machine, the code a GPU session will run against the versions of the lent GPU machine's image
# (torch 2.11.0, torchvision 0.26.0, triton 3.6.0 there; torch 2.14.1 and triton 3.8.0 in .venv here), so that a
# version difference costs no device minutes. The three wheels (~730 MB, seconds from PyPI; no CUDA libraries:
# .venv's nvidia-* packages serve) go to $DIR/site and shadow .venv's through PYTHONPATH. Steps (CHECKS, any of):
#   kernels  tools/compile_kernels.py --cases stages,options: every Triton kernel variant built for sm_90 by the
#            image's Triton and its ptxas (~45 s)
#   step     device_session.sh's CPU check of issues 18 / 19's calls: gputests compare step recipe (~2 min)
#   feed     device_session.sh's CPU check of issue 20's calls: feedffcv feed feeddn e2e (~3 min)
#   suite    the whole test suite (~19 min on 2 cores)
# Usage (repo root, after tools/setup.sh): bash benchmarks/gpu/check-device-versions.sh   [CHECKS="kernels step feed"]
# Each step's log is $DIR/<step>.log; the last lines say which steps passed. Exit status: the number that failed.
set -u
TORCH=${TORCH:-2.11.0}
TORCHVISION=${TORCHVISION:-0.26.0}
TRITON=${TRITON:-3.6.0}
DIR=${DIR:-/tmp/device-versions}
CHECKS=${CHECKS:-"kernels step feed"}
py=.venv/bin/python
[ -x "$py" ] || { echo "check-device-versions: run tools/setup.sh first (no $py)" >&2; exit 2; }
mkdir -p "$DIR"
site=$DIR/site-torch-$TORCH-triton-$TRITON
if [ ! -f "$site/.complete" ]; then
  rm -rf "$site" "$DIR/wheels"
  "$py" -m pip download -q --no-deps --only-binary=:all: -d "$DIR/wheels" \
    "torch==$TORCH" "torchvision==$TORCHVISION" "triton==$TRITON" || exit 2
  "$py" -m pip install -q --no-deps --no-compile --target "$site" "$DIR"/wheels/*.whl || exit 2
  rm -rf "$DIR/wheels"
  touch "$site/.complete"
fi
export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
"$py" -c "import torch, torchvision, triton; print('check-device-versions: torch', torch.__version__,
'torchvision', torchvision.__version__, 'triton', triton.__version__)" || exit 2

failed=0
summary=()
run_check() {  # name, "line|file:path|..." what must hold (whole lines of the log, files; "" for none), command...
  local name=$1 expected=$2; shift 2
  local start=$SECONDS missing=() line
  echo "=== $(date +%T) $name"
  "$@" >"$DIR/$name.log" 2>&1
  local rc=$?
  IFS='|' read -r -a lines <<<"$expected"
  for line in "${lines[@]}"; do
    case $line in
      file:*) [ -s "${line#file:}" ] || missing+=("${line#file:}") ;;
      *) grep -qxF "$line" "$DIR/$name.log" || missing+=("'$line'") ;;
    esac
  done
  if [ "$rc" != 0 ] || [ ${#missing[@]} -gt 0 ]; then
    failed=$((failed + 1))
    summary+=("$name: FAILED (exit $rc${missing[*]:+; missing ${missing[*]}}), $((SECONDS - start)) s, $DIR/$name.log")
  else
    summary+=("$name: passed, $((SECONDS - start)) s, $DIR/$name.log")
  fi
}
has() { [[ " $CHECKS " == *" $1 "* ]]; }
session() { env WORK="$DIR/work-$1" OUT="$DIR/out-$1" PY="$py" "${@:2}" bash benchmarks/gpu/device_session.sh; }
# On the CPU the session's GPU-only parts fail as they should (the compile warm-ups, the Triton layer items): what must
# hold is each step's own end line.
has kernels && run_check kernels "" "$py" tools/compile_kernels.py --cases stages,options --out "$DIR/kernels"
has step && run_check step "pytest exit 0|compare auto exit 0|compare false exit 0|gpu_step exit 0|recipe exit 0" \
  session step STEPS="gputests compare step recipe" RECIPE_DEVICE=cpu COMPARE_EPOCHS=3 \
  RECIPE_EPOCHS=1 RECIPE_EXTRA="data.subset=256 data.image_size=16" STEP_ARGS=--dry-run
bench=$DIR/work-feed/bench
has feed && rm -rf "$bench" && run_check feed \
  "e2e exit 0|file:$bench/feed-ffcv/results.json|file:$bench/feed-dali/results.json|file:$bench/feed-dali-dn/results.json" \
  session feed STEPS="feedffcv feed feeddn e2e" IMAGENET_SAMPLE=../shared/data/imagenet-sample \
  COPIES=2 DEVICES=cpu MODEL=resnet18 BENCH_BATCH=8 FEED_DALI_DEVICE=cpu FEED_THREADS=2 FFCV_WORKERS=2 FFCV_RES=64 \
  BENCH_EXTRA="--resolution 64 --seconds 1 --windows 1 --warmup-seconds 0 --compile off" E2E_EPOCHS=1 \
  E2E_EXTRA="data.image_size=64 data.batch_size=8 data.subset=32"
has suite && run_check suite "" "$py" -m pytest -q -p no:cacheprovider
for line in "${summary[@]}"; do echo "check-device-versions: $line"; done
exit "$failed"
