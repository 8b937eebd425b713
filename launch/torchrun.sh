#!/usr/bin/env bash
# Training under torchrun, one node or several.
#
#   launch/torchrun.sh --config configs/cityscapes_full.yaml data.root=/data/cityscapes
#   NNODES=4 NODE_RANK=$i MASTER_ADDR=node0 launch/torchrun.sh --config ... --resume
#   launch/torchrun.sh segment --config configs/cityscapes_full.yaml     # the segmenter
#
# DRY_RUN=1 prints the command instead of running it.
# Arguments go to `python -m pipeline train` (or `segment`, named first) unchanged. Environment:
#   NPROC_PER_NODE  processes per node (default: the visible GPUs, else 1)
#   NNODES          nodes (default 1: a standalone rendezvous on this machine)
#   NODE_RANK       this node's index (multi-node only; rendezvous picks one if unset)
#   MASTER_ADDR     rendezvous host (multi-node), MASTER_PORT its port (default 29500)
#   RDZV_ID         rendezvous id shared by the nodes of one job (default: jpdse)
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
nproc=${NPROC_PER_NODE:-$(( gpus > 0 ? gpus : 1 ))}
nnodes=${NNODES:-1}

if [[ "$nnodes" == 1 ]]; then
  run_or_print torchrun --standalone --nproc_per_node="$nproc" -m pipeline "$command" "$@"
  exit 0
fi
: "${MASTER_ADDR:?set MASTER_ADDR to the rendezvous host for a multi-node run}"
run_or_print torchrun \
  --nnodes="$nnodes" --nproc_per_node="$nproc" ${NODE_RANK:+--node_rank="$NODE_RANK"} \
  --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv_id="${RDZV_ID:-jpdse}" \
  -m pipeline "$command" "$@"
