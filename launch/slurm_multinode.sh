#!/bin/bash
# Multi-node QAT fine-tuning on SLURM: one `accelerate launch` per node, each starting one
# process per GPU; node 0 is the rendezvous host.
#
#   sbatch launch/slurm_multinode.sh recipes/opt350m_sst2.yaml --max_steps 2000
#
# Global batch = per_device_train_batch_size x GPUS_PER_NODE x nodes x grad accumulation.
# Resume after preemption or a crash: resubmit with --resume_from_checkpoint true (or put
# `resume_from_checkpoint: true` in the recipe); output_dir must be on a shared file system.
# Use ACCELERATE_CONFIG=launch/fsdp.yaml (or deepspeed_zero2.yaml) for sharded training.
#SBATCH --job-name=qat
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1          # one launcher per node; it spawns the GPU processes
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --requeue                    # preempted jobs come back and resume (see above)

set -euo pipefail
RECIPE=${1:?usage: sbatch launch/slurm_multinode.sh RECIPE.yaml [--key value ...]}
shift
GPUS_PER_NODE=${SLURM_GPUS_PER_NODE:-8}
GPUS_PER_NODE=${GPUS_PER_NODE##*:}   # "h100:8" -> 8
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-launch/multi_gpu_ddp.yaml}
MAIN_PROCESS_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MAIN_PROCESS_PORT=${MAIN_PROCESS_PORT:-29500}
NUM_PROCESSES=$((SLURM_NNODES * GPUS_PER_NODE))

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}   # compute nodes rarely reach the Hub
mkdir -p logs

# srun starts one task per node; SLURM_NODEID is that node's rank (escaped: read on the node).
srun --kill-on-bad-exit=1 bash -c "accelerate launch \
  --config_file $ACCELERATE_CONFIG \
  --num_machines $SLURM_NNODES \
  --num_processes $NUM_PROCESSES \
  --machine_rank \$SLURM_NODEID \
  --main_process_ip $MAIN_PROCESS_IP \
  --main_process_port $MAIN_PROCESS_PORT \
  --rdzv_backend static \
  --same_network \
  qat/train.py $RECIPE $*"
