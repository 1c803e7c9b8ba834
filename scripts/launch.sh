#!/usr/bin/env bash
# Shared launcher: runs `python -m MODULE ARGS...` (e.g. `textbind train ...`) under DeepSpeed's launcher
# on 1..N GPUs / nodes.
#   NUM_GPUS   GPUs per node (default: all visible; on a machine without GPUs, 1 CPU process per "GPU")
#   HOSTFILE   DeepSpeed hostfile for several nodes ("host slots=8" lines); MASTER_ADDR / MASTER_PORT
set -euo pipefail
MODULE=$1; shift
LAUNCH=(deepspeed)
[[ -n "${HOSTFILE:-}" ]] && LAUNCH+=(--hostfile "$HOSTFILE")
[[ -n "${NUM_GPUS:-}" ]] && LAUNCH+=(--num_gpus "$NUM_GPUS")
[[ -n "${NUM_NODES:-}" ]] && LAUNCH+=(--num_nodes "$NUM_NODES")
[[ -n "${MASTER_ADDR:-}" ]] && LAUNCH+=(--master_addr "$MASTER_ADDR")
LAUNCH+=(--master_port "${MASTER_PORT:-29500}")
exec "${LAUNCH[@]}" --module "$MODULE" "$@"
