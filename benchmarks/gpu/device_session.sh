#!/usr/bin/env bash
# One GPU session, prepared to run unattended in a single call on a lent GPU machine (no internet; torch, cupy and
# pytest already there; DALI carried as wheel parts by ../shared/gpu/stage-dali-wheels.sh into .gpuwheels/):
#   1. install DALI from the parts, print what the machine has;
#   2. the GPU tests (`pytest -m gpu`) and, at the same time, a short real `--loader dali` training run
#      (ResNet-50 with divisive normalization, mixed decoding) on the repeated real ImageNet sample;
#   3. the GPU benchmark matrix (loader-only and ResNet-50 AMP channels-last training against the compute-only
#      upper bound), torch DataLoader vs DALI mixed, into $OUT.
# Every step has its own time cap so one failure cannot eat the others' time; everything lands in $OUT.
# Usage (repo root): OUT=/tmp/out IMAGENET_SAMPLE=.gpudata/imagenet-sample bash benchmarks/gpu/device_session.sh
# FFCV: run benchmarks/gpu/stage-ffcv.sh here first and carry .gpuffcv (~27 MB) in the call; STEPS="... ffcv".
# The sequence of session 3 (4 calls, ~10 device-minutes with the start; 64 MiB travel per call):
#   bash benchmarks/gpu/stage-ffcv.sh; bash benchmarks/gpu/stage-dali-site.sh  # here, once
#   1. carry .gpuffcv .gpudata .gpudali/part-00: IMAGENET_SAMPLE=$PWD/.gpudata/imagenet-sample STEPS="ffcv bgtests"
#      TEST_CAP=240 bash benchmarks/gpu/device_session.sh   (FFCV benchmark; GPU tests go on in the background)
#   2., 3. carry .gpudali/part-01, then part-02, at once after each other:
#      mkdir -p /tmp/dali-parts && cp .gpudali/part-* /tmp/dali-parts/
#   4. carry .gpudali/part-03: IMAGENET_SAMPLE=... STEPS="tests train decode" PYTEST_K=dali DALI_DECODE=cpu
#      TEST_CAP=120 BG_WAIT=150 bash benchmarks/gpu/device_session.sh
# A session that needs no DALI, FFCV or data (issue 18: the training step itself), one call, nothing carried:
#   OUT=$OUT STEPS="step" bash benchmarks/gpu/device_session.sh   (run's timeout_s ~300; ~4 min of the 15)
#   step: benchmarks/gpu_step.py into $OUT/step/ (results.json + results.md): the `ours` DN layer eager /
#   compiled / Triton vs BatchNorm+ReLU and its memory floor at the ResNet-50 stage shapes, ResNet-18 and -50 with
#   and without DN, eager and compiled, and the issue's targets. STEP_CAP (default 240 s) caps it, STEP_ARGS adds
#   arguments (e.g. "--parts models" or "--models resnet50" to split it over two calls). Add "tests" (with
#   TEST_CAP) for the GPU tests in the same call when the budget allows; DALI and the sample tree are set up only
#   for the steps that read data.
# Issues 18 + 19, what sessions 4 and 5 left (two calls back to back, nothing carried; the machine started in ~30 s):
#   1. OUT=$OUT STEPS="gputests step" PYTEST_K="not test_benchmark and not test_train_run" GPUTEST_CAP=200
#      STEP_CAP=300 bash benchmarks/gpu/device_session.sh   (timeout_s ~540: phase 1 ~210 s, the kernel, fused-BN and
#      capture tests beside the warm-ups; step ~300: the unit-tail items and ours_fused models are new). The GPU tests
#      of test_benchmark (~110 s in session 4) and test_train_run (three compiled AlexNet runs, never passed: session
#      4's cap of 170 s ended them mid-compile) do not fit here; they run as bgtests in issue 20's session (below).
#   2. at once (compile caches still warm): OUT=$OUT STEPS="tune recipe" TUNE_KERNELS=fused_bn TUNE_CAP=140
#      RECIPE_CAP=150 (timeout_s ~320). Left for a later call: r18 (2 x R18_CAP), tune of the dn kernel.
#   Then: if the fused GPU tests pass and ours_fused (or ours_fused_kernel) beats ours, make divnorm_specs.fuse_bn
#   default auto (and kernel=auto's compiled choice the faster of the two).
#   add compare (2 x COMPARE_CAP) only with time to spare.
# Session 4's call: OUT=$OUT STEPS="gputests compare step recipe" ... (timeout_s 560)
#   phase 1, untimed, side by side (~170 s): the GPU tests without DALI / FFCV (GPUTEST_CAP), the compile-cache
#   warm-up of gpu_step.py (7 processes, WARM_CAP) and the capture-vs-uncaptured accuracy check (compare: two
#   COMPARE_EPOCHS runs, COMPARE_CAP each); then, alone on the machine, the timed step (STEP_CAP, ~180 s) and the
#   90-epoch AlexNet-DN recipe (RECIPE_CAP, cuda graphs + compile by default). Everything comes back packed in
#   $OUT/session.tar.gz (step/, step-warm/, compare/, recipe-alexnet-dn/, pytest-gpu.*) beside log.txt.
#   CPU check of the mechanics: OUT=/tmp/ds STEPS="gputests compare step recipe" RECIPE_DEVICE=cpu COMPARE_EPOCHS=3
#   RECIPE_EPOCHS=1 RECIPE_EXTRA="data.subset=256 data.image_size=16" STEP_ARGS=--dry-run PY=.venv/bin/python
set -u
OUT=${OUT:-/tmp/gpu-session}
PY=${PY:-python3}
COPIES=${COPIES:-100}
BENCH_CAP=${BENCH_CAP:-200}
TEST_CAP=${TEST_CAP:-140}
MODEL=${MODEL:-resnet50}
DALI_DEVICE=${DALI_DEVICE:-gpu}
DEVICES=${DEVICES:-gpu}
DALI_DECODE=${DALI_DECODE:-auto}
STEP_CAP=${STEP_CAP:-240}
STEP_ARGS=${STEP_ARGS:-}
STEPS=${STEPS:-"tests train bench"}  # any of: gputests compare step tune recipe r18 tests bgtests train bench decode hwdec ffcv dn feed feedffcv feeddn e2e
# bgtests: the GPU tests in a background process session (setsid) that outlives the call, for a machine kept warm
# by the next calls (e.g. the transfers of DALI's parts); the next call's tests / train / bench steps wait for it
# (at most BG_WAIT s) and copy its log. PYTEST_K: a -k filter for the GPU tests; BENCH_ROOT: where benchmark folders go (default: packed into bench.tar.gz)
has() { [[ " $STEPS " == *" $1 "* ]]; }
any_of() { local name; for name in "$@"; do has "$name" && return 0; done; return 1; }
# steps that read images (DALI, FFCV, the sample tree) or may import DALI (the GPU tests' DALI cases)
needs_data() { any_of tests bgtests train bench decode hwdec ffcv dn feed feedffcv feeddn e2e; }
# (step, recipe, compare and gputests need none of it: a call of only those ends after them)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/log.txt") 2>&1
step() { echo "=== $(date +%T) $*"; }
repo=$PWD
work=${WORK:-/tmp/gpu-work}
mkdir -p "$work"

step machine
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
echo "cpus: $(nproc)"; $PY -V
$PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available())"

# ---- phase 1, nothing timed (STEPS gputests / compare / step with STEP_WARM=1): side by side -------------------
# gputests: the GPU tests that need neither DALI, FFCV nor data (`-m gpu`, DALI / FFCV cases deselected), in the
#   background; compare: the recipe's capture-vs-uncaptured accuracy check, shortened (COMPARE_EPOCHS, default 9,
#   steplr every COMPARE_EPOCHS/3), both runs from the same seed and data; step + STEP_WARM=1 (default): gpu_step.py
#   --warm-cache processes that compile every compiled item once, so the timed run after them compiles from the cache.
# Everything of these steps lands in $KEEP and is packed into $OUT/session.tar.gz after each step (a call brings
# back 8 files at most; a killed call still brings the last pack and log.txt).
KEEP=$work/keep
mkdir -p "$KEEP"
pack() { tar -czf "$OUT/session.tar.gz.tmp" -C "$KEEP" . 2>/dev/null && mv "$OUT/session.tar.gz.tmp" "$OUT/session.tar.gz"; }
bg=()
if has gputests; then
  step "GPU tests (no DALI / FFCV / data), in the background"
  # -k: a trainer test installs a SIGTERM handler (preemption) that outlives the signal of a plain timeout
  (timeout -k 10 "${GPUTEST_CAP:-170}" $PY -m pytest -m gpu -v -p no:cacheprovider --timeout 120 -o addopts=-ra \
     -k "not dali and not ffcv${PYTEST_K:+ and ($PYTEST_K)}" tests/test_graphed.py tests/test_divnorm_kernel.py tests/test_fused_bn.py \
     tests/test_train_run.py tests --junitxml="$KEEP/pytest-gpu.xml" >"$KEEP/pytest-gpu.txt" 2>&1
   echo "pytest exit $?" >>"$KEEP/pytest-gpu.txt") &
  bg+=($!)
fi
if has step && [ "${STEP_WARM:-1}" = 1 ]; then
  step "compile-cache warm-up: gpu_step.py --warm-cache, 7 processes"
  warm() { local name=$1; shift
    (timeout -k 10 "${WARM_CAP:-150}" $PY benchmarks/gpu_step.py --warm-cache --out "$KEEP/step-warm/$name" \
       --time-cap $((${WARM_CAP:-150} - 5)) --item-cap 140 "$@" >"$KEEP/step-warm/$name.txt" 2>&1
     echo "warm $name exit $?" >>"$KEEP/step-warm/$name.txt") &
    bg+=($!)
  }
  mkdir -p "$KEEP/step-warm"
  warm r50-nonorm --parts models --models resnet50 --divnorms nonorm
  warm r50-ours --parts models --models resnet50 --divnorms ours
  warm r50-fused --parts models --models resnet50 --divnorms ours_fused
  warm r50-fused-kernel --parts models --models resnet50 --divnorms ours_fused_kernel
  warm r18 --parts models --models resnet18
  warm layer-01 --parts layer --shapes 0,1
  warm layer-23 --parts layer --shapes 2,3
fi
if has compare; then
  step "compare: capture vs uncaptured, ${COMPARE_EPOCHS:-9} epochs of the recipe each, same seed"
  ce=${COMPARE_EPOCHS:-9}
  for graphs in auto false; do
    timeout -k 10 "${COMPARE_CAP:-80}" $PY -m train synthetic alexnet "compare-graphs-$graphs" data.synthetic_size=40000 \
      data.workers=4 data.eval_batch_size=null optimizer.weight_decay=0.0001 optimizer.no_weight_decay_on_norm=false \
      lr_scheduler.name=steplr lr_scheduler.step_size=$((ce / 3)) lr_scheduler.gamma=0.1 --loader gpu \
      --device "${RECIPE_DEVICE:-cuda}" --epochs "$ce" --overwrite model.divnorm_specs.type=ours data.batch_size=128 \
      training.cuda_graphs=$graphs logging.progress_bar=off logging.runs_dir="$work/compare-runs" ${RECIPE_EXTRA:-} \
      >"$work/compare-$graphs.txt" 2>&1
    echo "compare $graphs exit $?" >>"$work/compare-$graphs.txt"; tail -2 "$work/compare-$graphs.txt"
    mkdir -p "$KEEP/compare/$graphs"
    cp "$work/compare-$graphs.txt" "$KEEP/compare/$graphs/log.txt"
    cp "$work/compare-runs/compare-graphs-$graphs"/{config.json,metrics.jsonl,summary.json} "$KEEP/compare/$graphs/" \
      2>/dev/null
  done
  pack
fi
if [ ${#bg[@]} -gt 0 ]; then
  step "waiting for ${#bg[@]} background process(es)"
  wait "${bg[@]}"
  has gputests && tail -15 "$KEEP/pytest-gpu.txt"
  has step && tail -qn 2 "$KEEP"/step-warm/*.txt 2>/dev/null
  pack
fi

if has step; then
  step "the GPU step: DN layer vs BatchNorm+ReLU and the floor, ResNets with and without DN, eager and compiled"
  # needs neither DALI nor FFCV nor data; the script's own time cap stops starting items 15 s before this one
  timeout -k 10 "$STEP_CAP" $PY benchmarks/gpu_step.py --out "$KEEP/step" --time-cap $((STEP_CAP - 15)) $STEP_ARGS 2>&1 \
    | tail -60
  echo "gpu_step exit ${PIPESTATUS[0]}"
  pack
fi

# ---- tune (issue 18): the fused kernels' launch shape swept at the ResNet-50 stage shapes (forward and backward apart,
# each against its memory floor): TUNE_KERNELS (default "fused_bn dn": the ReLU -> DN -> BatchNorm kernels, then the DN
# kernel), TUNE_CAP (s) each. Commit the best setting as divnorm/triton_ours.py's TUNING (both share it).
if has tune; then
  for kernel in ${TUNE_KERNELS:-fused_bn dn}; do
    step "tune $kernel: tile / warps / backward programs at the ResNet-50 stage shapes"
    timeout -k 10 "${TUNE_CAP:-170}" $PY benchmarks/tune_divnorm_kernel.py --kernel "$kernel" --out "$KEEP/tune-$kernel" \
      --time-cap $((${TUNE_CAP:-170} - 20)) 2>&1 | tail -4
    pack
  done
fi

# ---- recipe (issue 19): the original CIFAR-100 recipe end to end, no DALI / FFCV needed --------------------------
# AlexNet with DN (ours), batch 128, 90 epochs, SGD lr 0.05 nesterov, wd 1e-4, steplr 30 / 0.1 = configs/cifar100/
# alexnet.json; on CIFAR-100 when CIFAR100_DIR holds cifar-100-python/, else on the synthetic set sized to CIFAR-100's
# splits (data.synthetic_size=40000: 40,000 / 10,000 / 10,000) with that file's settings as overrides (the resolved
# configs are equal but for data.synthetic_size). The run's config.json, metrics.jsonl, summary.json and log go to
# $OUT/recipe-alexnet-dn/ (commit them under benchmarks/<machine>/recipe-alexnet-dn/). Target: <= 120 s wall.
# RECIPE_CAP caps it (s); RECIPE_DEVICE, RECIPE_EPOCHS and RECIPE_EXTRA (overrides, last wins) for a CPU check:
#   OUT=/tmp/r STEPS=recipe COPIES=1 RECIPE_DEVICE=cpu RECIPE_EPOCHS=1 RECIPE_EXTRA="data.subset=256 data.image_size=16" \
#     bash benchmarks/gpu/device_session.sh
if has recipe; then
  step "recipe: AlexNet-DN, the original CIFAR-100 recipe (${RECIPE_EPOCHS:-90} epochs)"
  recipe_args=(synthetic alexnet recipe-alexnet-dn data.synthetic_size=40000 data.workers=4 data.eval_batch_size=null
    optimizer.weight_decay=0.0001 optimizer.no_weight_decay_on_norm=false
    lr_scheduler.name=steplr lr_scheduler.step_size=30 lr_scheduler.gamma=0.1)
  if [ -n "${CIFAR100_DIR:-}" ] && [ -d "$CIFAR100_DIR/cifar-100-python" ]; then
    recipe_args=(cifar100 alexnet recipe-alexnet-dn --data-dir "$CIFAR100_DIR")
  fi
  # its own runs folder: the pack step copies every summary.json under $work/runs as train-summary.json
  timeout -k 10 "${RECIPE_CAP:-300}" $PY -m train "${recipe_args[@]}" --loader gpu --device "${RECIPE_DEVICE:-cuda}" \
    --epochs "${RECIPE_EPOCHS:-90}" --overwrite model.divnorm_specs.type=ours data.batch_size=128 \
    logging.progress_bar=off logging.runs_dir="$work/recipe-runs" ${RECIPE_EXTRA:-} >"$work/recipe.txt" 2>&1
  rc=$?; [ $rc = 124 ] && rc="124: stopped by RECIPE_CAP=${RECIPE_CAP:-300} s"
  echo "recipe exit $rc" >>"$work/recipe.txt"
  tail -6 "$work/recipe.txt"
  mkdir -p "$KEEP/recipe-alexnet-dn"
  for f in config.json metrics.jsonl summary.json; do
    cp "$work/recipe-runs/recipe-alexnet-dn/$f" "$KEEP/recipe-alexnet-dn/" 2>/dev/null || echo "recipe: no $f"
  done
  cp "$work/recipe.txt" "$KEEP/recipe-alexnet-dn/log.txt"
  pack
fi
# ---- r18 (issue 19): ResNet-18 with DN in the trainer (--loader gpu, batch 512, 32 px, CUDA graphs + compile) against
# its compiled fixed-batch bound (gpu_step.py, the same model, batch and resolution), one after the other, alone on
# the machine. Target: the trainer's epochs >= 95 % of the bound. R18_CAP (s) caps each, R18_EPOCHS (default 4).
if has r18; then
  step "r18: ResNet-18-DN in the trainer vs its compiled fixed-batch bound"
  timeout -k 10 "${R18_CAP:-120}" $PY -m train synthetic resnet18 r18-dn data.synthetic_size=40000 --loader gpu \
    --device "${RECIPE_DEVICE:-cuda}" --epochs "${R18_EPOCHS:-4}" --overwrite model.divnorm_specs.type=ours \
    data.batch_size=512 logging.progress_bar=off logging.runs_dir="$work/r18-runs" ${RECIPE_EXTRA:-} >"$work/r18.txt" 2>&1
  echo "r18 exit $?" >>"$work/r18.txt"; tail -3 "$work/r18.txt"
  mkdir -p "$KEEP/r18-dn"
  cp "$work/r18-runs/r18-dn"/{config.json,metrics.jsonl,summary.json} "$KEEP/r18-dn/" 2>/dev/null
  cp "$work/r18.txt" "$KEEP/r18-dn/log.txt"
  timeout -k 10 "${R18_CAP:-120}" $PY benchmarks/gpu_step.py --out "$KEEP/r18-dn/bound" --parts models \
    --models resnet18 --divnorms ours --time-cap $((${R18_CAP:-120} - 10)) $STEP_ARGS 2>&1 | grep "resnet18"
  pack
fi
# ---- end of recipe -------------------------------------------------------------------------------------------------
if ! needs_data; then
  step done
  exit 0
fi

step install DALI
unxz() { if command -v xz >/dev/null; then xz -d -T0; else $PY -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.stdin.buffer), sys.stdout.buffer)"; fi; }
# benchmarks/gpu/stage-dali-site.sh's parts: a carried path is gone again at the next call that carries another, so
# each call's part is kept in $DALI_PARTS (outside the checkout, kept while the machine stays warm)
parts=${DALI_PARTS:-/tmp/dali-parts}
mkdir -p "$parts" && { cp .gpudali/part-* "$parts/" 2>/dev/null || true; }
if ls "$parts"/part-* >/dev/null 2>&1 && [ ! -d .gpusite/nvidia/dali ]; then
  rm -rf .gpusite.tmp && mkdir -p .gpusite.tmp  # installed only when every part is there (the xz stream is whole)
  if (set -o pipefail; cat "$parts"/part-* | unxz | tar -x -C .gpusite.tmp) 2>/dev/null; then
    rm -rf .gpusite && mv .gpusite.tmp .gpusite
  else
    echo "DALI: $(ls "$parts" | wc -l) part(s) in $parts, not all of them yet: not installed"; rm -rf .gpusite.tmp
  fi
fi
[ -d .gpusite/nvidia/dali ] && export PYTHONPATH=$repo/.gpusite${PYTHONPATH:+:$PYTHONPATH}
if ls .gpuwheels/part-* >/dev/null 2>&1 && ! $PY -c "import nvidia.dali" 2>/dev/null; then
  cat .gpuwheels/part-* | tar -x -C .gpuwheels
  $PY -m pip install -q --no-index --no-deps --no-compile .gpuwheels/*.whl 2>&1 | tail -3 || true
  if ! $PY -c "import nvidia.dali" 2>/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target .gpusite .gpuwheels/*.whl 2>&1 | tail -3
    export PYTHONPATH=$repo/.gpusite
  fi
fi
$PY -c "import nvidia.dali as d, nvidia.dali.backend as b; print('dali', d.__version__, 'gpus', b.GetCUDADeviceCount())"
export PYTHONPATH=$repo${PYTHONPATH:+:$PYTHONPATH}

step "FFCV (when staged by benchmarks/gpu/stage-ffcv.sh)"
if [ -d .gpuffcv/site ] && $PY -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then  # built for 3.12
  export PYTHONPATH=$PYTHONPATH:$repo/.gpuffcv/site
fi
$PY -c "import ffcv; print('ffcv', ffcv.__version__)" 2>&1 | tail -1

step sample tree
tree=$work/imagenet-tree
$PY tools/benchmark.py --make-sample-tree "$tree" --copies "$COPIES" --val-copies 2 | tail -1

if [ -f "$work/pytest-bg.txt" ] && ! has bgtests; then
  step "waiting for the background GPU tests"
  for _ in $(seq "${BG_WAIT:-150}"); do [ -f "$work/pytest-bg.done" ] && break; sleep 1; done
  tail -30 "$work/pytest-bg.txt"; cp "$work/pytest-bg.txt" "$work/pytest-bg.xml" "$OUT/" 2>/dev/null
fi

step "GPU tests and a DALI training run, side by side"
tests=
has tests && (timeout -k 10 "$TEST_CAP" $PY -m pytest -m gpu -q -p no:cacheprovider --timeout 120 -o addopts=-ra ${PYTEST_K:+-k "$PYTEST_K"} \
   --junitxml="$OUT/pytest-gpu.xml" >"$work/pytest.txt" 2>&1; echo "pytest exit $?" >>"$work/pytest.txt") &
has tests && tests=$!
has train && timeout -k 10 "$TEST_CAP" $PY -m train imagenet "$MODEL" gpu-dali-dn --loader dali --data-dir "$tree" --epochs 4 \
  --overwrite data.batch_size=256 data.dali_device="$DALI_DEVICE" data.dali_decode="$DALI_DECODE" data.workers=8 model.divnorm_specs.type=ours \
  model.zero_init_residual=true lr_scheduler.name=cosine lr_scheduler.t_max=4 \
  logging.progress_bar=off logging.runs_dir="$work/runs" >"$work/train.txt" 2>&1
has train && echo "train exit $?" >>"$work/train.txt"
[ -n "$tests" ] && wait $tests
has tests && tail -40 "$work/pytest.txt"; has train && tail -25 "$work/train.txt"

step benchmark
# BENCH_COMPILE (default off): the caps below were sized for eager steps; the benchmark's own default (auto, as the
# trainer: compiled on a GPU) compiles ResNet-50 once per setting process, a minute each on a fresh machine
bench() {  # cap in seconds, name, then benchmark arguments (a later --compile overrides BENCH_COMPILE)
  local cap=$1 name=$2; shift 2
  # BENCH_EXTRA: arguments after the step's own (a CPU check shrinks resolution and time with it)
  timeout -k 10 "$cap" $PY tools/benchmark.py --dataset imagenet --data "$tree" --devices "$DEVICES" \
    --batch-sizes "${BENCH_BATCH:-256}" --compile "${BENCH_COMPILE:-off}" \
    --seconds 6 --windows 3 --warmup-seconds 3 --setting-timeout 90 --cache "$work/cache" --out "${BENCH_ROOT:-$work/bench}/$name" "$@" \
    ${BENCH_EXTRA:-} 2>&1 | grep -v "^\s*$" | tail -40
}
has bench && bench "$BENCH_CAP" resnet50 --loaders torch,dali --dali-devices gpu --workers 8,16 --mode both --model "$MODEL" --divnorm nonorm --tune
has bench && bench 60 resnet50-dn --loaders dali --dali-devices gpu --workers 8 --mode train --model "$MODEL" --divnorm ours
has bench && bench 40 dali-cpu --loaders dali --dali-devices cpu --workers 16 --mode loader
# where a GPU pipeline decodes (data.dali_decode): libjpeg-turbo on DALI's CPU threads vs mixed (nvJPEG + hardware)
has decode && bench 200 resnet50-cpudecode --loaders dali --dali-devices gpu --workers 8,12,15 --mode both --model "$MODEL" \
  --divnorm nonorm --option dali_decode=cpu
has decode && bench 70 resnet50-mixed --loaders dali --dali-devices gpu --workers 8 --mode train --model "$MODEL" --divnorm nonorm
# FFCV (issue 6): decoding on the CPU, normalization on the GPU (cupy), ResNet-50 against its upper bound
has ffcv && bench 240 resnet50-ffcv --loaders ffcv --workers 8,16 --mode both --model "$MODEL" --divnorm nonorm
# divisive normalization's GPU cost (2.8x in eager mode on the H200): eager vs torch.compile, DN and no DN
has dn && bench 300 resnet50-dn-compile --loaders dali --dali-devices gpu --workers 8 --mode train --model "$MODEL" \
  --divnorm nonorm,ours --compile off,on --setting-timeout 240  # compiling ResNet-50 takes a minute or more
# the hardware JPEG decoder's share (data.hw_decoder_load): more on the NVJPG engines leaves more SMs to training
has hwdec && bench 100 resnet50-hw1 --loaders dali --dali-devices gpu --workers 8 --mode both --model "$MODEL" \
  --divnorm nonorm --option hw_decoder_load=1.0

# ---- issue 20: feed the compiled ResNet-50 (224 px, batch 256), every comparison one benchmark run against its own
# compiled bound (--compile on: each setting process compiles once, from the inductor cache after the first).
# feedffcv: FFCV (CPU decoding, FFCV_WORKERS, default 16) at the resolution it trains at (FFCV_RES, default 176: the
#   middle of ffcv-imagenet's 160 -> 192 ramp), the bound at the same resolution, from a conversion at FFCV_MAX_RES
#   (default 256). Needs no DALI: the first call.
# feed: DALI, its levers as --variant settings of one run (FEED_VARIANTS, default: hardware decoder share 1.0, CPU
#   decoding, training on a high-priority stream; e.g. add dali:prefetch=3 or
#   dali:hw_decoder_load=1.0,loader_priority=low), each with the GPU time per image of DALI's kernels beside training
#   (--profile-steps); --tune writes $work/tuned.json for e2e; FEED_DALI_MAX_RES=256 runs it on shards re-encoded at
#   most 256 px (DALI's CPU decoding 2.0x faster on the CPU machine: benchmarks/cpu-2cpu/stored-resolution/).
#   feeddn: ResNet-50 with DN after every conv, fed by the default DALI setting, against its own compiled bound. e2e: `python -m train imagenet resnet50 r50 --loader
#   auto` (the tuned file of feed, else the committed benchmarks/<machine>/tuned.json; the log names the file),
#   E2E_EPOCHS epochs on the sample tree.
# The calls for a session of issue 20 (~11 of the 15 device-minutes; stage here first: bash
# benchmarks/gpu/stage-ffcv.sh; bash benchmarks/gpu/stage-dali-site.sh; and .gpudata/imagenet-sample from
# ../shared/data), each at once after the last (an idle machine goes back after ~30 s):
#   1. carry .gpuffcv .gpudata .gpudali/part-00: IMAGENET_SAMPLE=$PWD/.gpudata/imagenet-sample STEPS="feedffcv"
#      (timeout_s ~300: machine start, sample tree, conversion, FEEDFFCV_CAP 200)
#   2., 3. carry .gpudali/part-01, then part-02: mkdir -p /tmp/dali-parts && cp .gpudali/part-* /tmp/dali-parts/
#      (call 2 also, after the cp: OUT=$OUT STEPS=bgtests PYTEST_K="(test_benchmark or test_train_run) and not dali
#      and not ffcv" TEST_CAP=300 bash benchmarks/gpu/device_session.sh: the GPU tests issue 18's calls leave out run
#      while the parts travel; call 4 waits for them, BG_WAIT=200, before it times anything)
#   4. carry .gpudali/part-03 .gpudata: IMAGENET_SAMPLE=... STEPS="feed e2e" (timeout_s ~560); feeddn in a later
#      call if the budget allows (~120 s).
# CPU check of the mechanics (DALI's CPU pipeline, FFCV on the CPU, a small model, minutes):
#   OUT=/tmp/feed STEPS="feedffcv feed feeddn e2e" PY=.venv/bin/python IMAGENET_SAMPLE=../shared/data/imagenet-sample
#   COPIES=2 DEVICES=cpu MODEL=resnet18 BENCH_BATCH=8 FEED_DALI_DEVICE=cpu FEED_THREADS=2 FFCV_WORKERS=2 FFCV_RES=64
#   BENCH_EXTRA="--resolution 64 --seconds 1 --windows 1 --warmup-seconds 0 --compile off" E2E_EPOCHS=1
#   E2E_EXTRA="data.image_size=64 data.batch_size=8 data.subset=32" bash benchmarks/gpu/device_session.sh
# each setting process compiles ResNet-50 (cold ~1 min, then from the inductor cache): --setting-timeout 200
feed_common=(--mode train --model "$MODEL" --compile on --profile-steps "${PROFILE_STEPS:-10}" --setting-timeout 200)
feed_variants=()  # FEED_VARIANTS: the --variant values, space-separated (5 settings fit FEED_CAP's 330 s)
for v in ${FEED_VARIANTS:-dali:hw_decoder_load=1.0 dali:dali_decode=cpu loader_priority=low}; do
  feed_variants+=(--variant "$v")
done
if has feedffcv; then
  # stored at most FFCV_MAX_RES px on the long side (default 256, as ffcv-imagenet's low-resolution recipe: a
  # 176-px crop and the 224-of-256 validation crop need no more), timed apart; FFCV_MAX_RES=0 keeps the tree's sizes
  step "feedffcv: convert the tree for FFCV at max-res ${FFCV_MAX_RES:-256}"
  ffcv_data=$work/ffcv-maxres-${FFCV_MAX_RES:-256}
  ( time $PY tools/convert.py imagenet --src "$tree" --out "$ffcv_data" --format ffcv --max-res "${FFCV_MAX_RES:-256}" \
      >"$work/ffcv-convert.txt" 2>&1 ) 2>&1 | grep real; tail -1 "$work/ffcv-convert.txt"
  bench "${FEEDFFCV_CAP:-200}" feed-ffcv --data "$ffcv_data" --loaders ffcv --workers "${FFCV_WORKERS:-16}" \
    --divnorm nonorm --resolution "${FFCV_RES:-176}" "${feed_common[@]}"
fi
feed_data=$tree
if has feed && [ -n "${FEED_DALI_MAX_RES:-}" ]; then  # DALI shards re-encoded at most this many px (2.0x on the CPU)
  feed_data=$work/dali-maxres-$FEED_DALI_MAX_RES
  $PY tools/convert.py imagenet --src "$tree" --out "$feed_data" --format dali --max-res "$FEED_DALI_MAX_RES" | tail -1
fi
has feed && bench "${FEED_CAP:-330}" "feed-dali${FEED_DALI_MAX_RES:+-maxres-$FEED_DALI_MAX_RES}" --data "$feed_data" \
  --loaders dali --dali-devices "${FEED_DALI_DEVICE:-gpu}" --workers "${FEED_THREADS:-15}" --divnorm nonorm \
  "${feed_common[@]}" "${feed_variants[@]}" --tune "$work/tuned.json"
has feeddn && bench "${FEEDDN_CAP:-150}" feed-dali-dn --loaders dali --dali-devices "${FEED_DALI_DEVICE:-gpu}" \
  --workers "${FEED_THREADS:-15}" --divnorm ours "${feed_common[@]}"
if has e2e; then
  step "e2e: python -m train imagenet $MODEL r50 --loader auto, ${E2E_EPOCHS:-4} epochs on the sample tree"
  tuned=()  # this call's feed result, else the committed benchmarks/<machine>/tuned.json (the log names the file)
  [ -f "$work/tuned.json" ] && tuned=(data.tuned_path="$work/tuned.json")
  timeout -k 10 "${E2E_CAP:-200}" $PY -m train imagenet "$MODEL" r50 --loader auto --data-dir "$tree" \
    --epochs "${E2E_EPOCHS:-4}" --overwrite "${tuned[@]}" data.batch_size=256 \
    logging.progress_bar=off logging.runs_dir="$work/e2e-runs" ${E2E_EXTRA:-} >"$work/e2e.txt" 2>&1
  echo "e2e exit $?" >>"$work/e2e.txt"; tail -8 "$work/e2e.txt"
  mkdir -p "${BENCH_ROOT:-$work/bench}/e2e-r50"
  cp "$work/e2e-runs/r50"/{config.json,metrics.jsonl,summary.json} "$work/e2e.txt" "${BENCH_ROOT:-$work/bench}/e2e-r50/" \
    2>/dev/null
  cp "$work/tuned.json" "${BENCH_ROOT:-$work/bench}/e2e-r50/" 2>/dev/null
fi


if has bgtests; then
  step "GPU tests in the background (setsid), for the next call to collect"
  rm -f "$work/pytest-bg.done"
  setsid bash -c "timeout -k 10 $TEST_CAP $PY -m pytest -m gpu -q -p no:cacheprovider --timeout 150 -o addopts=-ra ${PYTEST_K:+-k '$PYTEST_K'} \
    --junitxml='$work/pytest-bg.xml' >'$work/pytest-bg.txt' 2>&1; echo \"pytest exit \$?\" >>'$work/pytest-bg.txt'; touch '$work/pytest-bg.done'" \
    </dev/null >/dev/null 2>&1 &
fi

step pack
cp "$work/train.txt" "$work/pytest.txt" "$OUT/" 2>/dev/null
find "$work/runs" -name summary.json -exec cp {} "$OUT/train-summary.json" \; 2>/dev/null
[ -d "$work/bench" ] && tar -C "$work" -czf "$OUT/bench.tar.gz" bench
ls -la "$OUT"
step done
