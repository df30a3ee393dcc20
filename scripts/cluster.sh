#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for trying and testing `hydra/launcher=slurm`:
# Debian's slurm-wlm (slurmctld + slurmd) and munge, on localhost only, with their own config,
# munge key, sockets, pid files, spool, state and logs in .cluster/ (git-ignored). A system SLURM or
# munge, if there is one, is never read or touched: every daemon and client is pointed at
# .cluster/slurm.conf, whose ports are derived from this folder's path so that two checkouts can
# each run one.
#
#   scripts/cluster.sh up       start munged, slurmctld, slurmd; wait until the node is idle
#   scripts/cluster.sh down     cancel this cluster's jobs, stop the daemons
#   scripts/cluster.sh status   exit 0 when the cluster answers, else 1
#   scripts/cluster.sh env      print the line that points SLURM's clients at this cluster:
#                               eval "$(scripts/cluster.sh env)"
# `up` and `down` are idempotent. `up` installs slurm-wlm and munge with apt when they are missing
# and it runs as root.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DIR="${MAMLRUN_CLUSTER_DIR:-$ROOT/.cluster}"
CONF="$DIR/slurm.conf"
SOCKET="$DIR/munge/munge.socket"
NODE="$(hostname -s)"
PARTITION=debug
# A requeued job may start again after this many seconds (the job credential's lifetime): SLURM's
# default, 120 s, suits real clusters; 5 is the least it takes, plenty on localhost.
CRED_EXPIRE=5
export SLURM_CONF="$CONF"
say() { echo "cluster: $*"; }
die() { echo "cluster: error: $*" >&2; exit 1; }

need_tools() {
  local tool missing=()
  for tool in munged mungekey slurmctld slurmd sbatch squeue scontrol scancel srun sinfo; do
    command -v "$tool" > /dev/null || missing+=("$tool")
  done
  [ ${#missing[@]} -eq 0 ] && return
  if [ "$(id -u)" -eq 0 ] && command -v apt-get > /dev/null; then
    say "installing slurm-wlm and munge with apt-get (missing: ${missing[*]})"
    # Debian does not start their services from a package install under a policy-rc.d (Docker's
    # images have one); started or not, this script never uses the system munge or slurm.
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      slurm-wlm munge > /dev/null
    return
  fi
  die "${missing[*]} not found: install SLURM and munge (Debian/Ubuntu, as root: apt-get install slurm-wlm munge)"
}

alive() {  # alive PIDFILE: the process named in PIDFILE runs
  [ -s "$1" ] && kill -0 "$(cat "$1")" 2> /dev/null
}

answers() {  # the controller answers and the node is up
  alive "$DIR/slurmctld.pid" && alive "$DIR/slurmd.pid" && scontrol ping > /dev/null 2>&1
}

write_conf() {
  local port detected cpus memory
  # Two ports from the folder's path: a second checkout's cluster (or a system SLURM on the
  # default 6817/6818) does not collide with this one.
  port=$((20000 + $(printf %s "$DIR" | cksum | cut -d' ' -f1) % 10000 * 2))
  # The node as slurmd itself detects it (CPUs, sockets, cores, threads, memory): a node that
  # claims more than slurmd finds is drained.
  detected="$(slurmd -C | head -n 1 | sed "s/^NodeName=[^ ]*/NodeName=$NODE NodeAddr=127.0.0.1/")"
  cpus="$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<< "$detected")"
  memory="$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<< "$detected")"
  cat > "$CONF" << EOF
# Written by scripts/cluster.sh up (rewritten at every start): a single-node cluster on localhost.
ClusterName=mamlrun
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=$(id -un)
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCKET,cred_expire=$CRED_EXPIRE
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
# No cgroups needed (containers, machines without systemd); task/affinity binds each job to its
# CPUs (sched_setaffinity), as a real cluster does.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
JobAcctGatherType=jobacct_gather/none
# No slurmdbd: sacct has no data here (mamlrun's slurm launcher asks squeue instead).
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
# A job that asks for no memory gets its CPUs' share of it, not the whole node (one job at a time).
DefMemPerCPU=$((memory / cpus))
SchedulerType=sched/backfill
# A job that waited (a requeued one, for its begin time) starts at the next pass of the main
# scheduling loop: every second here, not SLURM's 60 s.
SchedulerParameters=sched_interval=1
# Batch jobs may be requeued (scontrol requeue, preemption, submitit's timeout handler).
JobRequeue=1
# A request the node can never satisfy (more CPUs or memory than it has) is refused by sbatch
# instead of pending forever.
EnforcePartLimits=ALL
ReturnToService=2
# Finished jobs stay visible to squeue this long (the launcher reads their final state there).
MinJobAge=3600
$detected State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
  alive "$DIR/munge/munged.pid" && return
  # munged checks its folders: the socket's must be searchable by all, the key readable by its
  # owner only.
  mkdir -p "$DIR/munge" && chmod 755 "$DIR" "$DIR/munge"
  [ -s "$DIR/munge/munge.key" ] || mungekey --create --keyfile="$DIR/munge/munge.key" --bits=1024
  chmod 600 "$DIR/munge/munge.key"
  munged --socket="$SOCKET" --key-file="$DIR/munge/munge.key" --pid-file="$DIR/munge/munged.pid" \
    --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed" \
    || die "munged did not start; see $DIR/log/munged.log"
}

wait_for_node() {
  local state="" resumed=""
  for _ in $(seq 60); do
    state="$(sinfo --noheader --nodes="$NODE" --format=%t 2> /dev/null || true)"
    case "$state" in
      idle | mix | alloc) return ;;
      drain* | down*)  # as an earlier session left it (a job that would not end): resume once
        [ -n "$resumed" ] && break
        scontrol update nodename="$NODE" state=resume > /dev/null 2>&1 || true
        resumed=1
        ;;
      inval* | fail*) break ;;
    esac
    sleep 0.5
  done
  scontrol show node "$NODE" 2> /dev/null | grep -i reason >&2 || true
  die "node $NODE is '${state:-not reachable}'; see $DIR/log/slurmctld.log and slurmd.log"
}

up() {
  need_tools
  if answers; then
    say "already up ($CONF)"
    return
  fi
  # A Unix socket path has at most 107 bytes.
  [ ${#SOCKET} -le 100 ] || die "$SOCKET: path too long for a socket; set MAMLRUN_CLUSTER_DIR to a shorter folder"
  mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
  write_conf
  start_munge
  alive "$DIR/slurmctld.pid" || slurmctld -f "$CONF" || die "slurmctld did not start; see $DIR/log/slurmctld.log"
  alive "$DIR/slurmd.pid" || slurmd -f "$CONF" -N "$NODE" || die "slurmd did not start; see $DIR/log/slurmd.log"
  wait_for_node
  say "up: node $NODE ($(sinfo --noheader --format='%c CPUs, %m MB')), partition $PARTITION"
  say "clients: export SLURM_CONF=$CONF   (or: eval \"\$(make -s cluster-env)\")"
}

stop() {  # stop PIDFILE NAME: wait for the daemon to exit, then kill it
  local tries
  for tries in $(seq 40); do
    alive "$1" || { rm -f "$1"; return; }
    sleep 0.25
  done
  say "$2 did not stop; killing pid $(cat "$1")"
  kill -9 "$(cat "$1")" 2> /dev/null || true
  rm -f "$1"
}

down() {
  if alive "$DIR/slurmctld.pid"; then
    scancel --quiet --partition="$PARTITION" 2> /dev/null || true
    # Cancelled jobs get SIGTERM (a mamlrun job writes its checkpoint) and some seconds to end;
    # then the controller and the node's slurmd stop.
    for _ in $(seq 40); do
      [ -z "$(squeue --noheader --states=running,completing 2> /dev/null)" ] && break
      sleep 0.25
    done
    scontrol shutdown > /dev/null 2>&1 || true
  fi
  # slurmd is stopped by the controller's shutdown; by its pid when the controller was gone.
  alive "$DIR/slurmd.pid" && ! alive "$DIR/slurmctld.pid" && kill "$(cat "$DIR/slurmd.pid")"
  stop "$DIR/slurmctld.pid" slurmctld
  stop "$DIR/slurmd.pid" slurmd
  if alive "$DIR/munge/munged.pid"; then
    munged --stop --socket="$SOCKET" > /dev/null 2>&1 || kill "$(cat "$DIR/munge/munged.pid")"
  fi
  stop "$DIR/munge/munged.pid" munged
  say "down"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status)
    if answers; then
      say "up ($CONF)"
      sinfo --noheader --format='%P %D nodes %t, %c CPUs, %m MB'
    else
      say "not running"
      exit 1
    fi
    ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) die "usage: scripts/cluster.sh up|down|status|env" ;;
esac
