#!/usr/bin/env bash
# Multi-node training under SLURM: one torchrun per node, one process per GPU, NCCL between processes.
#
#   sbatch examples/slurm.sh imagenet resnet50 r50-4x8 data.path=/data/imagenet-converted --loader dali
#
# torchrun sets the standard variables every rank reads (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
# MASTER_ADDR, MASTER_PORT); this script only tells it the node count, this node's rank and the rendezvous point.
# runs/ (logging.runs_dir) must be on a file system every node sees: rank 0 writes the checkpoints, and the final
# test reads best.pt on every rank.
#SBATCH --job-name=divnorm
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%j.out
set -euo pipefail

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
port=${MASTER_PORT:-29500}
# data loading threads per rank: the node's cores split between its ranks (the trainer does the same split)
export OMP_NUM_THREADS=$(( ${SLURM_CPUS_PER_TASK:-$(nproc)} / GPUS_PER_NODE ))

srun --kill-on-bad-exit=1 python -m torch.distributed.run \
  --nnodes "$SLURM_NNODES" \
  --nproc_per_node "$GPUS_PER_NODE" \
  --rdzv_id "$SLURM_JOB_ID" \
  --rdzv_backend c10d \
  --rdzv_endpoint "$head_node:$port" \
  -m train "$@"
