#!/usr/bin/env bash
# One Ray node of an occkd Slurm job (started by slurm/occkd.sbatch through srun, one per machine):
#   ray_node.sh head IP:PORT [ray start options]   |   ray_node.sh worker IP:PORT [ray start options]
# It tells Ray how many GPUs Slurm gave this step, from CUDA_VISIBLE_DEVICES as Slurm sets it (Ray, seeing
# the variable, hands its workers those device ids), and blocks until it is signalled: ending it ends every
# Ray process it started.
set -euo pipefail
role=$1 address=$2
shift 2
gpus=0
if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
  IFS=, read -ra ids <<< "$CUDA_VISIBLE_DEVICES"
  gpus=${#ids[@]}
fi
if [[ $role == head ]]; then
  exec ray start --head --node-ip-address="${address%:*}" --port="${address##*:}" --num-gpus="$gpus" "$@" --block
else
  exec ray start --address="$address" --num-gpus="$gpus" "$@" --block
fi
