#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for the tests of the grid's SLURM path (and for trying it by hand).
#
#   tools/slurm_local.sh start    install slurm-wlm + munge when missing (apt, as root), write a minimal slurm.conf,
#                                 start munged, slurmctld and slurmd, wait until the node is idle
#   tools/slurm_local.sh stop     stop the three daemons by their pid files
#   tools/slurm_local.sh status   exit 0 when the cluster answers and the node is up; prints `SLURM_CONF=...`
#   tools/slurm_local.sh env      print `export SLURM_CONF=...` (source it to use sbatch/squeue/sinfo by hand)
#
# State (config, spool, logs, pid files) lives in $MUGSHOTRACE_SLURM_DIR (default /tmp/mugshotrace-slurm). Nothing is
# written under /etc/slurm: clients find the cluster through SLURM_CONF. Needs root (daemons, apt); where it cannot
# start (a laptop without root or apt), `start` exits non-zero with one line and the SLURM tests skip with that reason.
#
# No accounting: `sacct` needs slurmdbd, whose only storage plugin is MySQL/MariaDB (Debian's slurm-wlm ships neither
# slurmdbd nor a file-based accounting plugin; accounting_storage/filetxt was removed from SLURM long ago). So jobs are
# seen with `squeue` while they exist (MinJobAge keeps finished ones in `scontrol show job` for 5 minutes) and in the
# job-completion log (JobCompType=jobcomp/filetxt: one line per finished job or array task, with JobState and
# ExitCode) in $STATE/log/jobcomp.txt. The grid's submitter waits with squeue for the same reason.
set -euo pipefail
STATE=${MUGSHOTRACE_SLURM_DIR:-/tmp/mugshotrace-slurm}
CONF=$STATE/slurm.conf
export SLURM_CONF=$CONF
NODE=$(hostname -s)
MUNGE_RUN=${MUGSHOTRACE_MUNGE_RUN:-/run/munge}

say() { echo "slurm_local: $*" >&2; }

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null && command -v sbatch >/dev/null; then return 0; fi
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then say "slurm-wlm/munge missing and cannot be installed here (needs root and apt-get)"; return 1; fi
  say "installing slurm-wlm and munge (apt-get)"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge) >"${TMPDIR:-/tmp}/slurm_local_apt.log" 2>&1 \
    || { say "apt-get install slurm-wlm munge failed (see ${TMPDIR:-/tmp}/slurm_local_apt.log)"; return 1; }
}

write_conf() {
  mkdir -p "$STATE"/{ctld,spool,log}
  local cpus mem
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))   # MiB, less 1 GiB for the system
  cat >"$CONF" <<EOF
# written by tools/slurm_local.sh: one node, one partition, no cgroups, no accounting database
ClusterName=mugshotrace-local
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# a requeued job waits cred_expire+1 seconds before it may start again (default 120 s): short for tests
AuthInfo=cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=5
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/log/jobcomp.txt
SchedulerType=sched/backfill
# schedule every few seconds (defaults: 60 s main loop, 30 s backfill) so tests do not wait on the scheduler
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# a job that asks for no memory gets 1 GiB per CPU (not the whole node), so array tasks share the node
DefMemPerCPU=1024
ReturnToService=2
# pre-emption by requeue is tested with \`scontrol requeue\`; a requeued batch job starts again
JobRequeue=1
KillWait=5
MinJobAge=300
MessageTimeout=20
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmdSpoolDir=$STATE/spool
StateSaveLocation=$STATE/ctld
NodeName=$NODE CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
}

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_munge() {
  if [ -S "$MUNGE_RUN/munge.socket.2" ] && munge -n </dev/null >/dev/null 2>&1; then return 0; fi
  mkdir -p "$MUNGE_RUN" /var/lib/munge /var/log/munge
  [ -f /etc/munge/munge.key ] || { (command -v mungekey >/dev/null && mungekey --create) || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 2>/dev/null; }
  chown -R munge:munge "$MUNGE_RUN" /var/lib/munge /var/log/munge /etc/munge 2>/dev/null || true
  chmod 0700 /etc/munge; chmod 0400 /etc/munge/munge.key
  if id munge >/dev/null 2>&1; then runuser -u munge -- /usr/sbin/munged; else /usr/sbin/munged --force; fi
  for _ in $(seq 50); do munge -n </dev/null >/dev/null 2>&1 && return 0; sleep 0.1; done
  say "munged did not start"; return 1
}

node_state() { sinfo -h -n "$NODE" -o '%T' 2>/dev/null | head -1; }

start() {
  install_packages
  if status >/dev/null 2>&1; then say "already running ($CONF)"; echo "SLURM_CONF=$CONF"; return 0; fi
  write_conf
  start_munge
  pid_alive "$STATE/slurmctld.pid" || slurmctld -f "$CONF"
  pid_alive "$STATE/slurmd.pid" || slurmd -f "$CONF"
  for _ in $(seq 300); do
    case "$(node_state)" in idle*|mixed*|alloc*) say "node $NODE up ($(node_state)); export SLURM_CONF=$CONF"; echo "SLURM_CONF=$CONF"; return 0;; esac
    sleep 0.1
  done
  # a node left down/drained by an earlier run comes back with an explicit resume
  scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
  for _ in $(seq 100); do
    case "$(node_state)" in idle*|mixed*|alloc*) echo "SLURM_CONF=$CONF"; return 0;; esac
    sleep 0.1
  done
  say "the node did not come up (state: $(node_state || true)); logs in $STATE/log"; return 1
}

stop() {
  for d in slurmd slurmctld; do
    if pid_alive "$STATE/$d.pid"; then kill "$(cat "$STATE/$d.pid")" 2>/dev/null || true; fi
  done
  for _ in $(seq 50); do pid_alive "$STATE/slurmd.pid" || pid_alive "$STATE/slurmctld.pid" || break; sleep 0.1; done
  for d in slurmd slurmctld; do pid_alive "$STATE/$d.pid" && kill -9 "$(cat "$STATE/$d.pid")" 2>/dev/null || true; rm -f "$STATE/$d.pid"; done
  if [ -f "$MUNGE_RUN/munged.pid" ]; then kill "$(cat "$MUNGE_RUN/munged.pid")" 2>/dev/null || true; fi
  say "stopped"
}

status() {
  [ -f "$CONF" ] || { say "not configured ($CONF missing)"; return 1; }
  pid_alive "$STATE/slurmctld.pid" && pid_alive "$STATE/slurmd.pid" || { say "daemons not running"; return 1; }
  local s; s=$(node_state)
  case "$s" in idle*|mixed*|alloc*|completing*) echo "SLURM_CONF=$CONF"; sinfo >&2; return 0;; esac
  say "node $NODE is '$s'"; return 1
}

case "${1:-}" in
  start) start;;
  stop) stop;;
  status) status;;
  env) echo "export SLURM_CONF=$CONF";;
  *) echo "usage: $0 start|stop|status|env" >&2; exit 2;;
esac
