#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for the tests of the grid's SLURM path (and for trying it by hand).
#
#   tools/slurm_local.sh start    install slurm-wlm + munge when missing (apt, as root), write a minimal slurm.conf,
#                                 start munged, (accounting: MariaDB, slurmdbd), slurmctld and slurmd, wait until the
#                                 node is idle; prints how many seconds it took
#   tools/slurm_local.sh stop     stop the daemons (and slurmdbd, MariaDB) by their pid files
#   tools/slurm_local.sh status   exit 0 when the cluster answers and the node is up; prints `SLURM_CONF=...`
#   tools/slurm_local.sh env      print `export SLURM_CONF=...` (source it to use sbatch/squeue/sinfo by hand)
#
# State (config, spool, logs, pid files) lives in $MUGSHOTRACE_SLURM_DIR (default /tmp/mugshotrace-slurm). Nothing is
# written under /etc/slurm: clients find the cluster through SLURM_CONF. Needs root (daemons, apt); where it cannot
# start (a laptop without root or apt), `start` exits non-zero with one line and the SLURM tests skip with that reason.
#
# Accounting (`sacct`): unless MUGSHOTRACE_SLURM_ACCOUNTING=0, `start` also installs slurmdbd + mariadb-server when
# missing, runs a private MariaDB (data, socket, pid and log under $STATE/db, TCP on 127.0.0.1 at a free port, nothing
# under /var/lib/mysql), creates slurm_acct_db and its user, writes $STATE/slurmdbd.conf (mode 600, SlurmUser root),
# starts slurmdbd, registers the cluster with sacctmgr and sets AccountingStorageType=accounting_storage/slurmdbd.
# If any step fails it says why in one line, stops what it started and runs the cluster without accounting, as
# before: jobs are then seen with `squeue` while they exist (MinJobAge keeps finished ones in `scontrol show job` for
# 5 minutes) and in the job-completion log (JobCompType=jobcomp/filetxt: one line per finished job or array task,
# with JobState and ExitCode) in $STATE/log/jobcomp.txt, which is written in both cases. `start` and `status` print
# `SLURM_ACCOUNTING=1` or `SLURM_ACCOUNTING=0` on stdout.
#
# Ports: slurmctld $MUGSHOTRACE_SLURM_PORT (default 6817), slurmd +1, slurmdbd +2 -- set another base to run a
# second cluster (another state folder) beside a first one. munged is shared and stopped only by the `stop` of the
# state folder that started it.
set -euo pipefail
STATE=${MUGSHOTRACE_SLURM_DIR:-/tmp/mugshotrace-slurm}
CONF=$STATE/slurm.conf
export SLURM_CONF=$CONF
NODE=$(hostname -s)
CLUSTER=mugshotrace-local
MUNGE_RUN=${MUGSHOTRACE_MUNGE_RUN:-/run/munge}
PORT=${MUGSHOTRACE_SLURM_PORT:-6817}
DB=$STATE/db
ACCT_FILE=$STATE/accounting   # "1" or "0 ...": whether the last start got accounting

say() { echo "slurm_local: $*" >&2; }

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null && command -v sbatch >/dev/null; then return 0; fi
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then say "slurm-wlm/munge missing and cannot be installed here (needs root and apt-get)"; return 1; fi
  say "installing slurm-wlm and munge (apt-get)"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge) >"${TMPDIR:-/tmp}/slurm_local_apt.log" 2>&1 \
    || { say "apt-get install slurm-wlm munge failed (see ${TMPDIR:-/tmp}/slurm_local_apt.log)"; return 1; }
}

write_conf() {   # $1: 1 = accounting through slurmdbd
  mkdir -p "$STATE"/{ctld,spool,log}
  local acct="AccountingStorageType=accounting_storage/none"
  [ "${1:-0}" = 1 ] && acct="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$((PORT + 2))"
  local cpus mem
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))   # MiB, less 1 GiB for the system
  cat >"$CONF" <<EOF
# written by tools/slurm_local.sh: one node, one partition, no cgroups
ClusterName=$CLUSTER
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
AuthType=auth/munge
# a requeued job waits cred_expire+1 seconds before it may start again (default 120 s): short for tests
AuthInfo=cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=5
$acct
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

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1" 2>/dev/null)" 2>/dev/null; }

start_munge() {
  if [ -S "$MUNGE_RUN/munge.socket.2" ] && munge -n </dev/null >/dev/null 2>&1; then return 0; fi
  mkdir -p "$MUNGE_RUN" /var/lib/munge /var/log/munge
  [ -f /etc/munge/munge.key ] || { (command -v mungekey >/dev/null && mungekey --create) || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 2>/dev/null; }
  chown -R munge:munge "$MUNGE_RUN" /var/lib/munge /var/log/munge /etc/munge 2>/dev/null || true
  chmod 0700 /etc/munge; chmod 0400 /etc/munge/munge.key
  if id munge >/dev/null 2>&1; then runuser -u munge -- /usr/sbin/munged; else /usr/sbin/munged --force; fi
  touch "$STATE/munge.started"   # this state folder started munged: its `stop` stops it
  for _ in $(seq 50); do munge -n </dev/null >/dev/null 2>&1 && return 0; sleep 0.1; done
  say "munged did not start"; return 1
}

# ---- accounting: a private MariaDB + slurmdbd (each step returns non-zero with one line on failure) ----
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
sql() { mariadb --no-defaults --protocol=socket --socket="$DB/mysqld.sock" -uroot "$@"; }

install_accounting() {
  if command -v slurmdbd >/dev/null && command -v mariadbd >/dev/null && command -v mariadb-install-db >/dev/null; then return 0; fi
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then say "slurmdbd/mariadb-server missing and cannot be installed here (needs root and apt-get)"; return 1; fi
  say "installing slurmdbd and mariadb-server (apt-get)"
  # policy-rc.d keeps Debian's own mariadb service from starting: the cluster runs its private one
  local deny=0; [ -e /usr/sbin/policy-rc.d ] || { printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; deny=1; }
  local rc=0
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmdbd mariadb-server) >"${TMPDIR:-/tmp}/slurm_local_apt_dbd.log" 2>&1 || rc=1
  [ $deny = 1 ] && rm -f /usr/sbin/policy-rc.d
  [ $rc = 0 ] || { say "apt-get install slurmdbd mariadb-server failed (see ${TMPDIR:-/tmp}/slurm_local_apt_dbd.log)"; return 1; }
}

start_mariadb() {
  if pid_alive "$DB/mysqld.pid" && mariadb-admin --no-defaults --socket="$DB/mysqld.sock" -uroot ping >/dev/null 2>&1; then return 0; fi
  mkdir -p "$DB" "$STATE/log"
  if [ ! -d "$DB/data/mysql" ]; then
    rm -rf "$DB/data"
    mariadb-install-db --no-defaults --user=root --datadir="$DB/data" --auth-root-authentication-method=socket --skip-test-db \
      >"$STATE/log/mariadb-install.log" 2>&1 || { say "mariadb-install-db failed (see $STATE/log/mariadb-install.log)"; return 1; }
  fi
  local port; port=$(free_port) || { say "no free TCP port for MariaDB"; return 1; }
  echo "$port" >"$DB/port"
  setsid mariadbd --no-defaults --user=root --datadir="$DB/data" --socket="$DB/mysqld.sock" --pid-file="$DB/mysqld.pid" \
    --port="$port" --bind-address=127.0.0.1 --skip-networking=0 --log-error="$STATE/log/mariadb.log" \
    --innodb-buffer-pool-size=128M --innodb-log-file-size=64M --innodb-lock-wait-timeout=900 --skip-log-bin \
    </dev/null >/dev/null 2>&1 &
  for _ in $(seq 300); do
    mariadb-admin --no-defaults --socket="$DB/mysqld.sock" -uroot ping >/dev/null 2>&1 && [ -f "$DB/mysqld.pid" ] && return 0
    sleep 0.1
  done
  say "MariaDB did not start (see $STATE/log/mariadb.log)"; return 1
}

start_slurmdbd() {
  local pw port; port=$(cat "$DB/port")
  [ -f "$DB/pass" ] || { (umask 077; head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' >"$DB/pass"); }
  pw=$(cat "$DB/pass")
  sql -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
          CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$pw';
          CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$pw';
          GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
          GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';" 2>"$STATE/log/mariadb-setup.log" \
    || { say "creating slurm_acct_db and its user failed (see $STATE/log/mariadb-setup.log)"; return 1; }
  (umask 077; cat >"$STATE/slurmdbd.conf" <<EOF
# written by tools/slurm_local.sh: the accounting daemon of the local cluster, storing in its private MariaDB
AuthType=auth/munge
DbdHost=localhost
DbdPort=$((PORT + 2))
SlurmUser=root
PidFile=$STATE/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$port
StorageUser=slurm
StoragePass=$pw
StorageLoc=slurm_acct_db
EOF
  )
  chmod 600 "$STATE/slurmdbd.conf"; chown root:root "$STATE/slurmdbd.conf"
  pid_alive "$STATE/slurmdbd.pid" || slurmdbd >>"$STATE/log/slurmdbd.log" 2>&1 || { say "slurmdbd did not start (see $STATE/log/slurmdbd.log)"; return 1; }
  # slurmdbd answers once it has created its tables; then the cluster is registered (idempotent)
  for _ in $(seq 150); do
    if sacctmgr -n -P show cluster format=Cluster >"$STATE/log/sacctmgr.log" 2>&1; then
      grep -qx "$CLUSTER" "$STATE/log/sacctmgr.log" && return 0
      sacctmgr -i add cluster "$CLUSTER" >>"$STATE/log/sacctmgr.log" 2>&1 && return 0
    fi
    sleep 0.2
  done
  say "slurmdbd did not answer or the cluster could not be registered (see $STATE/log/slurmdbd.log, $STATE/log/sacctmgr.log)"; return 1
}

stop_accounting() {
  for f in "$STATE/slurmdbd.pid" "$DB/mysqld.pid"; do pid_alive "$f" && kill "$(cat "$f" 2>/dev/null)" 2>/dev/null || true; done
  for _ in $(seq 100); do pid_alive "$STATE/slurmdbd.pid" || pid_alive "$DB/mysqld.pid" || break; sleep 0.1; done
  for f in "$STATE/slurmdbd.pid" "$DB/mysqld.pid"; do pid_alive "$f" && kill -9 "$(cat "$f" 2>/dev/null)" 2>/dev/null || true; rm -f "$f"; done
}

start_accounting() {   # 0 when slurmdbd is up and the cluster registered; else one line why, and nothing left running
  if [ "${MUGSHOTRACE_SLURM_ACCOUNTING:-1}" = 0 ]; then echo "0 MUGSHOTRACE_SLURM_ACCOUNTING=0" >"$ACCT_FILE"; return 1; fi
  # the slurm.conf that slurmdbd and sacctmgr read (through SLURM_CONF) must name the dbd before they run
  write_conf 1
  if install_accounting && start_mariadb && start_slurmdbd; then echo 1 >"$ACCT_FILE"; return 0; fi
  echo "0 see the line above" >"$ACCT_FILE"; stop_accounting
  say "running without accounting (sacct will not work; the job-completion log still records every job)"; return 1
}

acct_line() { if [ "$(head -c1 "$ACCT_FILE" 2>/dev/null)" = 1 ]; then echo SLURM_ACCOUNTING=1; else echo SLURM_ACCOUNTING=0; fi; }

node_state() { sinfo -h -n "$NODE" -o '%T' 2>/dev/null | head -1; }

start() {
  install_packages
  if status >/dev/null 2>&1; then say "already running ($CONF)"; echo "SLURM_CONF=$CONF"; acct_line; return 0; fi
  local t0=$SECONDS acct=0
  mkdir -p "$STATE"
  start_munge
  if start_accounting; then acct=1; fi
  write_conf $acct
  pid_alive "$STATE/slurmctld.pid" || slurmctld -f "$CONF"
  pid_alive "$STATE/slurmd.pid" || slurmd -f "$CONF"
  for _ in $(seq 300); do
    case "$(node_state)" in idle*|mixed*|alloc*) say "node $NODE up ($(node_state)), accounting $acct, $((SECONDS - t0)) s; export SLURM_CONF=$CONF"; echo "SLURM_CONF=$CONF"; acct_line; return 0;; esac
    sleep 0.1
  done
  # a node left down/drained by an earlier run comes back with an explicit resume
  scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
  for _ in $(seq 100); do
    case "$(node_state)" in idle*|mixed*|alloc*) echo "SLURM_CONF=$CONF"; acct_line; return 0;; esac
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
  stop_accounting
  if [ -f "$STATE/munge.started" ] && [ -f "$MUNGE_RUN/munged.pid" ]; then kill "$(cat "$MUNGE_RUN/munged.pid")" 2>/dev/null || true; fi
  rm -f "$STATE/munge.started"
  say "stopped"
}

status() {
  [ -f "$CONF" ] || { say "not configured ($CONF missing)"; return 1; }
  pid_alive "$STATE/slurmctld.pid" && pid_alive "$STATE/slurmd.pid" || { say "daemons not running"; return 1; }
  local s; s=$(node_state)
  case "$s" in idle*|mixed*|alloc*|completing*) echo "SLURM_CONF=$CONF"; acct_line; sinfo >&2; return 0;; esac
  say "node $NODE is '$s'"; return 1
}

case "${1:-}" in
  start) start;;
  stop) stop;;
  status) status;;
  env) echo "export SLURM_CONF=$CONF";;
  *) echo "usage: $0 start|stop|status|env" >&2; exit 2;;
esac
