#!/usr/bin/env bash
# Several machines: run this on every node with the same HEAD (node 0's address) and RUN_ID.
#   HEAD=10.0.0.1 NNODES=2 NPROC=8 RUN_ID=exp42 launch/multi_node.sh trainer.max_epochs=30
# torchrun's c10d rendezvous assigns ranks; global rank 0 composes the config and
# broadcasts the run directory, so the run has one directory (put it on a shared disk).
set -euo pipefail
: "${HEAD:?set HEAD to the address of node 0}" "${NNODES:?set NNODES}" "${NPROC:?set NPROC (processes per node)}"
RUN_ID=${RUN_ID:-distloop}
PORT=${PORT:-29500}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# NCCL: pick the network interface if the default one is wrong (e.g. NCCL_SOCKET_IFNAME=eth0),
# NCCL_DEBUG=INFO to see what it chose.
exec torchrun --nnodes "$NNODES" --nproc-per-node "$NPROC" \
  --rdzv-backend c10d --rdzv-endpoint "$HEAD:$PORT" --rdzv-id "$RUN_ID" \
  -m distloop strategy=ddp "$@"
