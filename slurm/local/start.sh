#!/bin/bash
# A real SLURM cluster on this machine, for tests and for trying `lmtrain submit`:
# slurmctld plus two slurmd "nodes" (node1, node2) on localhost, munge for auth.
# Everything lives under one directory (default /tmp/lmtrain-slurm). Needs root and
# Debian/Ubuntu packages (installed here if missing). Stop it with slurm/local/stop.sh.
#
#   slurm/local/start.sh [DIR]      then: export SLURM_CONF=DIR/slurm.conf; sinfo
set -euo pipefail

DIR=${1:-/tmp/lmtrain-slurm}
CPUS=${LMTRAIN_SLURM_CPUS:-4}

if [ "$(id -u)" != 0 ]; then echo "start.sh: needs root (the daemons run as root)" >&2; exit 2; fi
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  echo "start.sh: installing slurmctld slurmd slurm-client munge" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi

mkdir -p "$DIR"/{run,state,spool,log,munge}
chmod 0755 "$DIR" "$DIR/run"      # munged refuses a socket dir others cannot traverse
chmod 0700 "$DIR/munge"
HOST=$(hostname)
CONF=$DIR/slurm.conf

[ -f "$DIR/munge/munge.key" ] || mungekey --create --keyfile="$DIR/munge/munge.key" >/dev/null 2>&1 \
  || dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
chmod 0400 "$DIR/munge/munge.key"
if ! [ -S "$DIR/run/munge.socket.2" ] || ! pgrep -f "munged.*$DIR/run/munge.socket.2" >/dev/null; then
  munged --key-file="$DIR/munge/munge.key" --socket="$DIR/run/munge.socket.2" --pid-file="$DIR/run/munged.pid" \
         --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munge.seed" --force
fi

cat > "$CONF" <<CONF
ClusterName=lmtrain-local
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/run/munge.socket.2
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/slurmd-%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.txt
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmdParameters=config_overrides
MpiDefault=none
SwitchType=switch/none
MinJobAge=300
KillWait=5
NodeName=node[1-2] NodeHostname=$HOST NodeAddr=127.0.0.1 Port=[17001-17002] CPUs=$CPUS RealMemory=1024 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF

export SLURM_CONF=$CONF
slurmctld -f "$CONF"
for n in node1 node2; do slurmd -f "$CONF" -N "$n"; done

for _ in $(seq 1 60); do
  if [ "$(sinfo -h -o '%t' 2>/dev/null | sort -u | tr -d '\n')" = "idle" ]; then
    echo "SLURM_CONF=$CONF"
    exit 0
  fi
  sleep 0.5
done
echo "start.sh: the nodes did not become idle; see $DIR/log/" >&2
sinfo >&2 || true
exit 1
