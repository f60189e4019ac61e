#!/usr/bin/env bash
# N processes on this machine, one per GPU (or N CPU processes with gloo).
#   launch/single_node.sh 8 trainer.max_epochs=30
# The same as `distloop launcher.nproc_per_node=8 strategy=ddp ...`, with torchrun outside:
# rank 0 composes the config and picks the one run directory; the others receive it.
set -euo pipefail
NPROC=${1:?usage: single_node.sh NPROC [hydra overrides...]}
shift
# One OpenMP thread per process unless told otherwise: N processes x all cores oversubscribes.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec torchrun --standalone --nproc-per-node "$NPROC" -m distloop strategy=ddp "$@"
