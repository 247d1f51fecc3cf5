#!/bin/bash
# Stop the local cluster started by slurm/local/start.sh [DIR] and remove its state.
set -uo pipefail
DIR=${1:-/tmp/lmtrain-slurm}
for pid in "$DIR"/run/*.pid; do
  [ -f "$pid" ] && kill "$(cat "$pid")" 2>/dev/null
done
for _ in $(seq 1 20); do
  pgrep -f "(slurmctld|slurmd|munged).*$DIR" >/dev/null || break
  sleep 0.25
done
pkill -9 -f "(slurmctld|slurmd).*$DIR/slurm.conf" 2>/dev/null
pkill -9 -f "munged.*$DIR/run" 2>/dev/null
rm -rf "$DIR"
exit 0
