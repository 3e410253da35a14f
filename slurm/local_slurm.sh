#!/usr/bin/env bash
# A real one-node Slurm on this machine (Debian's slurm-wlm: munged + slurmctld + slurmd), for testing
# slurm/occkd.sbatch without a cluster. Its node offers this machine's CPUs and FAKE_GPUS fake GPUs:
# character devices made here that Slurm hands out by --gres=gpu:N exactly as it hands out real ones
# (it sets CUDA_VISIBLE_DEVICES and SLURM_GPUS_ON_NODE from them); nothing can compute on them. It offers
# SLURM_CPUS CPUs (default: this machine's), more than there are if asked, so that tests can run two jobs.
#
#   slurm/local_slurm.sh start DIR   # config, state and logs under DIR; prints the SLURM_CONF to export
#   slurm/local_slurm.sh stop DIR
#
# Install first (Debian 12): apt-get install -y slurm-wlm munge
# The daemons run as root with their own ports (SLURMCTLD_PORT, default 6917, and the next one for
# slurmd), so they do not clash with a Slurm this machine may already run.
set -euo pipefail

action=${1:?usage: $0 start|stop DIR}
dir=$(realpath -m "${2:?usage: $0 start|stop DIR}")
fake_gpus=${FAKE_GPUS:-4}
cpus=${SLURM_CPUS:-$(nproc)}
ctld_port=${SLURMCTLD_PORT:-6917}
host=$(hostname -s)

stop() {
  for daemon in slurmd slurmctld; do
    local pid
    pid=$(cat "$dir/$daemon.pid" 2>/dev/null || true)
    if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
      kill "$pid"
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    rm -f "$dir/$daemon.pid"
  done
}

if [[ $action == stop ]]; then
  stop
  exit 0
elif [[ $action != start ]]; then
  echo "usage: $0 start|stop DIR" >&2
  exit 2
fi

for tool in munged slurmctld slurmd sbatch; do
  command -v "$tool" >/dev/null || { echo "$tool not found: apt-get install -y slurm-wlm munge" >&2; exit 1; }
done
stop  # a leftover from an earlier start in the same DIR
mkdir -p "$dir/state" "$dir/spool" "$dir/dev"

# munge: Slurm's authentication. Debian's package creates the key; start the daemon if none runs.
if ! pgrep -x munged >/dev/null; then
  [[ -f /etc/munge/munge.key ]] || mungekey --create
  mkdir -p /run/munge && chown munge:munge /run/munge 2>/dev/null || true
  if id munge >/dev/null 2>&1; then runuser -u munge -- munged; else munged --force; fi
fi

gres_line=""
if (( fake_gpus > 0 )); then
  for ((i = 0; i < fake_gpus; i++)); do
    [[ -e "$dir/dev/gpu$i" ]] || mknod "$dir/dev/gpu$i" c 1 3  # a character device, like /dev/null
  done
  echo "NodeName=$host Name=gpu File=$dir/dev/gpu[0-$((fake_gpus - 1))]" > "$dir/gres.conf"
  gres_line="Gres=gpu:$fake_gpus"
else
  : > "$dir/gres.conf"
fi

memory_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
cat > "$dir/slurm.conf" <<EOF
ClusterName=occkd-local
SlurmctldHost=$host
SlurmctldPort=$ctld_port
SlurmdPort=$((ctld_port + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
# No cgroups in a container: Slurm tracks a job's processes by their parent links, and signals them all.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
# scancel and the time limit: SIGTERM, then SIGKILL after KillWait seconds (Slurm's default, 30 s).
KillWait=30
GresTypes=gpu
# config_overrides: slurmd takes the CPUs given here even where the machine has fewer.
SlurmdParameters=config_overrides
NodeName=$host CPUs=$cpus RealMemory=$memory_mb $gres_line State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF

slurmctld -f "$dir/slurm.conf" -c   # -c: a fresh controller, no jobs from an earlier start
slurmd -f "$dir/slurm.conf"
export SLURM_CONF=$dir/slurm.conf
for _ in $(seq 100); do
  if sinfo -h -o %T 2>/dev/null | grep -qx idle; then
    echo "export SLURM_CONF=$dir/slurm.conf"
    exit 0
  fi
  sleep 0.2
done
echo "Slurm did not come up: see $dir/slurmctld.log and $dir/slurmd.log" >&2
sinfo >&2 || true
exit 1
