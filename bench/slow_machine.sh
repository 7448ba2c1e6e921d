#!/usr/bin/env bash
# Run a command on a uniformly slower machine: every process it starts (pytest, the CLI, Ray and its workers)
# shares a CPU quota of CORES cores, enforced by the kernel in 10 ms periods (a cgroup's CFS bandwidth limit).
# On a 2-core machine, SLOW_CORES=0.8 makes everything 2.5x slower: the project's estimate of the slower CPU-B
# kind on its own work (docs/results.md). Needs root and the cgroup cpu controller (v1 or v2).
#
#   SLOW_CORES=0.8 bash bench/slow_machine.sh .venv/bin/python -m pytest -q -m "not slow"
#
# It prints the command's wall time on stderr. The quota slows waiting for a core, not waiting for time (a sleep,
# a poll's interval, a socket), so it is a fair model of a slower CPU and a pessimistic one of a machine whose
# start-ups (Python imports, process spawns) slow down less than its arithmetic.
set -euo pipefail
CORES=${SLOW_CORES:-0.8}
[ "$#" -gt 0 ] || { echo "usage: SLOW_CORES=0.8 bash bench/slow_machine.sh COMMAND..." >&2; exit 2; }
[ "$(id -u)" -eq 0 ] || { echo "bench/slow_machine.sh: needs root (a cgroup)" >&2; exit 2; }
PERIOD=10000
QUOTA=$(awk -v c="$CORES" -v p="$PERIOD" 'BEGIN { q = int(c * p); if (q < 1000) exit 1; print q }') || {
  echo "bench/slow_machine.sh: SLOW_CORES=$CORES: at least 0.1 core" >&2; exit 2; }
NAME="carso-slow-$$"
if [ -f /sys/fs/cgroup/cgroup.controllers ]; then            # cgroup v2
  GROUP=/sys/fs/cgroup/$NAME
  grep -qw cpu /sys/fs/cgroup/cgroup.subtree_control || echo +cpu > /sys/fs/cgroup/cgroup.subtree_control
  mkdir "$GROUP"
  echo "$QUOTA $PERIOD" > "$GROUP/cpu.max"
elif [ -d /sys/fs/cgroup/cpu ]; then                          # cgroup v1
  GROUP=/sys/fs/cgroup/cpu/$NAME
  mkdir "$GROUP"
  echo "$PERIOD" > "$GROUP/cpu.cfs_period_us"
  echo "$QUOTA" > "$GROUP/cpu.cfs_quota_us"
else
  echo "bench/slow_machine.sh: no cgroup cpu controller under /sys/fs/cgroup" >&2; exit 2
fi
cleanup() {
  # Whatever outlived the command (none should) is moved back to the root group, then the group is removed.
  for pid in $(cat "$GROUP/cgroup.procs" 2>/dev/null); do echo "$pid" > "$(dirname "$GROUP")/cgroup.procs" 2>/dev/null || true; done
  rmdir "$GROUP" 2>/dev/null || true
}
trap cleanup EXIT
start=$(date +%s.%N)
set +e
bash -c 'echo $$ > "$1/cgroup.procs"; shift; exec "$@"' _ "$GROUP" "$@"
code=$?
set -e
end=$(date +%s.%N)
awk -v s="$start" -v e="$end" -v c="$CORES" -v n="$(nproc)" \
  'BEGIN { printf "[slow_machine] %.1f s wall on %s of %d cores (%.2fx slower)\n", e - s, c, n, n / c }' >&2
exit $code
