#!/bin/bash
# A single-node SLURM cluster on this machine, for tests and local use (Debian/Ubuntu, as root).
#
#   launch/local_cluster.sh up      # install slurm + munge if missing, start the daemons, wait until idle
#   launch/local_cluster.sh down    # stop only the daemons that `up` started (by the PIDs it recorded)
#   launch/local_cluster.sh status
#
# Settings (environment): SLURM_DIR (state, logs, pids; default /tmp/distill-slurm), NODE_CPUS
# (CPUs advertised; default 4, more than 2 real cores is fine), SLURM_CONF (default
# $SLURM_DIR/slurm.conf). Clients need the same SLURM_CONF: `export SLURM_CONF=$SLURM_DIR/slurm.conf`.
set -euo pipefail

SLURM_DIR=${SLURM_DIR:-/tmp/distill-slurm}
NODE_CPUS=${NODE_CPUS:-4}
export SLURM_CONF=${SLURM_CONF:-$SLURM_DIR/slurm.conf}
STARTED="$SLURM_DIR/started.pids"   # "name pid" per daemon this script started
HOST=$(hostname -s)

install_packages() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null && return
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    slurmctld slurmd slurm-client munge >/dev/null
}

alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }

start_munge() {
  local pidfile=/run/munge/munged.pid
  if [ -f "$pidfile" ] && alive "$(cat "$pidfile")"; then return; fi  # someone else's munged: leave it alone
  if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
  fi
  mkdir -p /run/munge && chown munge:munge /run/munge && chmod 0755 /run/munge
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do [ -s "$pidfile" ] && break; sleep 0.1; done
  echo "munged $(cat "$pidfile")" >> "$STARTED"
  for _ in $(seq 50); do munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && return; sleep 0.1; done
  echo "munged does not answer" >&2; return 1
}

write_conf() {
  mkdir -p "$SLURM_DIR/state" "$SLURM_DIR/spool" "$(dirname "$SLURM_CONF")"
  # Short credential expiry and scheduler intervals: a requeued job restarts in ~12 s, not ~3 min.
  cat > "$SLURM_CONF" <<EOF
ClusterName=distill-local
SlurmctldHost=$HOST(127.0.0.1)
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=10
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$SLURM_DIR/state
SlurmdSpoolDir=$SLURM_DIR/spool
SlurmctldPidFile=$SLURM_DIR/slurmctld.pid
SlurmdPidFile=$SLURM_DIR/slurmd.pid
SlurmctldLogFile=$SLURM_DIR/slurmctld.log
SlurmdLogFile=$SLURM_DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
EnforcePartLimits=ALL
SlurmdParameters=config_overrides
ReturnToService=2
SlurmdTimeout=300
InactiveLimit=0
KillWait=5
MinJobAge=600
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$NODE_CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$NODE_CPUS ThreadsPerCore=1 RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

start_daemon() {  # name binary
  local name=$1 binary=$2 pidfile="$SLURM_DIR/$1.pid"
  "$binary" -f "$SLURM_CONF"
  for _ in $(seq 50); do [ -s "$pidfile" ] && break; sleep 0.1; done
  echo "$name $(cat "$pidfile")" >> "$STARTED"
}

up() {
  if [ -s "$STARTED" ]; then echo "already up (see $STARTED); run '$0 down' first" >&2; exit 1; fi
  install_packages
  # Lightning uses the first node of SLURM_NODELIST as MASTER_ADDR: the name must resolve.
  getent hosts "$HOST" >/dev/null || echo "127.0.0.1 $HOST" >> /etc/hosts
  rm -rf "$SLURM_DIR" && mkdir -p "$SLURM_DIR" && : > "$STARTED"
  start_munge
  write_conf
  start_daemon slurmctld /usr/sbin/slurmctld
  start_daemon slurmd /usr/sbin/slurmd
  for _ in $(seq 150); do
    [ "$(sinfo -h -o %T 2>/dev/null)" = idle ] && { sinfo; echo "export SLURM_CONF=$SLURM_CONF"; return; }
    sleep 0.2
  done
  tail -n 20 "$SLURM_DIR"/*.log >&2
  echo "the node did not become idle" >&2
  exit 1
}

down() {
  [ -f "$STARTED" ] || { echo "nothing started by $0 in $SLURM_DIR"; return; }
  tac "$STARTED" | while read -r name pid; do  # slurmd, then slurmctld, then munged
    alive "$pid" || continue
    kill "$pid"
    for _ in $(seq 100); do alive "$pid" || break; sleep 0.1; done
    alive "$pid" && kill -9 "$pid"
    echo "stopped $name ($pid)"
  done
  rm -f "$STARTED"
}

status() {
  [ -f "$STARTED" ] && cat "$STARTED"
  sinfo 2>/dev/null || echo "no cluster answers at $SLURM_CONF"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
