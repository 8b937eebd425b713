#!/usr/bin/env bash
# Training under the DeepSpeed launcher (one node, or several through a hostfile and pdsh).
#
#   launch/deepspeed.sh --config configs/cityscapes_full.yaml data.root=/data/cityscapes
#   HOSTFILE=hosts.txt launch/deepspeed.sh --config ... --resume
#   launch/deepspeed.sh segment --config configs/cityscapes_full.yaml     # the segmenter
#
# DRY_RUN=1 prints the command instead of running it.
# Arguments go to `python -m pipeline train` (or `segment`, named first) unchanged; --no_local_rank keeps DeepSpeed from adding
# a --local_rank argument (the pipeline reads LOCAL_RANK from the environment, as under torchrun).
# Environment:
#   NUM_GPUS   processes per node (default: the visible GPUs, else 1; on CPU, that many processes)
#   HOSTFILE   DeepSpeed hostfile for multi-node runs ("host slots=N" lines)
#   MASTER_PORT  (default 29500)
# Relative paths in the arguments stay relative to the caller's directory.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
# shellcheck source=launch/slurm_lib.sh
source "$repo/launch/slurm_lib.sh"
# the first argument may name the command: train (the default) or segment (the segmenter, same launchers)
command=train
if [[ "${1:-}" == train || "${1:-}" == segment ]]; then
  command=$1
  shift
fi

gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
num_gpus=${NUM_GPUS:-$(( gpus > 0 ? gpus : 1 ))}
# torchrun sets one OpenMP thread per process by default; the DeepSpeed launcher does not, and
# on a CPU-only machine several ranks with a thread per core each slow each other down.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

args=(--master_port "${MASTER_PORT:-29500}" --no_local_rank --module)
if [[ -n "${HOSTFILE:-}" ]]; then
  args=(--hostfile "$HOSTFILE" "${args[@]}")
else
  args=(--num_gpus "$num_gpus" "${args[@]}")
fi
run_or_print deepspeed "${args[@]}" pipeline "$command" "$@"
