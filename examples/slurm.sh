#!/usr/bin/env bash
# Multi-node training under SLURM: one torchrun per node, one process per GPU, NCCL between processes.
# Preemption-safe: it requeues itself and resumes where it stopped (docs/preemption.md).
#
#   sbatch examples/slurm.sh imagenet resnet50 r50-4x8 data.path=/data/imagenet-converted --loader dali
#
# torchrun sets the standard variables every rank reads (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
# MASTER_ADDR, MASTER_PORT); this script only tells it the node count, this node's rank and the rendezvous point.
# runs/ (logging.runs_dir) must be on a file system every node sees: rank 0 writes the checkpoints, and the final
# test reads best.pt on every rank.
#
# Preemption: --signal=B:USR1@180 makes SLURM send SIGUSR1 to this script 180 s before the time limit (and a
# preempting scheduler sends SIGTERM). The trap forwards it to srun, srun to each node's torchrun, and torchrun
# (--signals_to_handle) to every trainer process, which saves last.pt at the next step boundary (the exact
# position inside the epoch) and exits with code 3. The script then requeues the job; the requeued job finds
# last.pt in the run folder and adds --resume. Save a checkpoint every N steps as well with
# checkpoint.every_steps=N (a node that dies without warning then loses at most N steps).
#SBATCH --job-name=divnorm
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@180
set -euo pipefail

PREEMPTED=3  # the trainer's exit code after a signal (python -m train --help)
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
port=${MASTER_PORT:-29500}
# data loading threads per rank: the node's cores split between its ranks (the trainer does the same split)
export OMP_NUM_THREADS=$(( ${SLURM_CPUS_PER_TASK:-$(nproc)} / GPUS_PER_NODE ))

# the run folder is <logging.runs_dir>/<exp>: resume when it already holds a checkpoint (a requeued job)
exp=${3:?usage: sbatch examples/slurm.sh <dataset> <model> <exp> [key=value ...] [options]}
runs_dir=$(python -m train "$@" --print-config | python -c 'import json, sys; print(json.load(sys.stdin)["logging"]["runs_dir"])')
resume=()
if [[ -f "$runs_dir/$exp/last.pt" ]]; then
  resume=(--resume)
  echo "$(date -Is) resuming $runs_dir/$exp (restart ${SLURM_RESTART_COUNT:-0})"
elif [[ -d "$runs_dir/$exp" && "${SLURM_RESTART_COUNT:-0}" -gt 0 ]]; then
  # requeued after a stop before the first checkpoint (e.g. during the first compile): nothing to keep
  resume=(--overwrite)
  echo "$(date -Is) restarting $runs_dir/$exp: no checkpoint yet (restart ${SLURM_RESTART_COUNT})"
fi

signalled=""
forward() {  # SLURM's warning (USR1) or a preemption (TERM): pass it on, let the trainer save, then requeue
  signalled=$1
  echo "$(date -Is) got SIG$1: asking the trainer to checkpoint"
  kill -s "$1" "$srun_pid" 2>/dev/null || true
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

# srun in the background and `wait`: bash runs a trap only between commands, and `wait` returns on a signal
srun --kill-on-bad-exit=1 python -m torch.distributed.run \
  --nnodes "$SLURM_NNODES" \
  --nproc_per_node "$GPUS_PER_NODE" \
  --rdzv_id "$SLURM_JOB_ID" \
  --rdzv_backend c10d \
  --rdzv_endpoint "$head_node:$port" \
  --signals_to_handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \
  --shutdown_timeout 170 \
  -m train "$@" "${resume[@]}" &
srun_pid=$!
status=0
while true; do
  wait "$srun_pid" && status=0 || status=$?
  kill -0 "$srun_pid" 2>/dev/null || break  # still running: `wait` was cut short by a trapped signal
done

# torchrun reports a worker's exit code 3 as a failure of its own (exit 1): a signal we forwarded counts too
if [[ $status -eq $PREEMPTED || -n "$signalled" ]] && [[ -f "$runs_dir/$exp/last.pt" ]]; then
  echo "$(date -Is) preempted (exit $status): requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$status"
