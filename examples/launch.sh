#!/usr/bin/env bash
# Launch `vlmtune train` on one node of a (possibly multi-node) job with torchrun.
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash examples/launch.sh configs/qwen3vl_8b.yaml [--key=value ...]
#
# Reads MindSpeed-MM's environment names so existing job scripts keep working:
#   NPROC_PER_NODE (or NPUS_PER_NODE, or GPUS_PER_NODE)  processes on this node   default: all visible GPUs, else 1
#   NNODES                                                 number of nodes           default 1
#   NODE_RANK                                              this node's index         default 0
#   MASTER_ADDR / MASTER_PORT                              rendezvous of node 0      default localhost / 29501
# Everything after the config file is passed to `vlmtune train` as overrides.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 CONFIG.yaml [--section.key=value ...]" >&2
  exit 2
fi
if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE="${NPUS_PER_NODE:-${GPUS_PER_NODE:-}}"
fi
if [ -z "${NPROC_PER_NODE}" ]; then
  NPROC_PER_NODE=$(python3 -c "import torch; print(max(torch.cuda.device_count(), 1))")
fi
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-localhost}"
MASTER_PORT="${MASTER_PORT:-29501}"
echo "vlmtune launch: node ${NODE_RANK}/${NNODES}, ${NPROC_PER_NODE} processes, master ${MASTER_ADDR}:${MASTER_PORT}" >&2
exec torchrun \
  --nnodes "${NNODES}" \
  --node_rank "${NODE_RANK}" \
  --nproc_per_node "${NPROC_PER_NODE}" \
  --master_addr "${MASTER_ADDR}" \
  --master_port "${MASTER_PORT}" \
  -m vlmtune.cli train "$@"
