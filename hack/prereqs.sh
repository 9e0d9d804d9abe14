#!/usr/bin/env bash
# Everything the test suites need that is slow to make cold, made at the same time (`make prereqs`):
#   cpu   hack/k8s-bins.sh, hack/epp.sh  Go builds of the Kubernetes binaries and the GIE endpoint picker
#                                      (CPU-bound, 15-25 min + ~5 min cold)
#   vllm  hack/vllm-env.sh             the pinned vLLM's CPU venv (download-bound, ~3 min cold)
#   node  hack/node.sh images, then hack/containerd-bins.sh
#                                      apt packages, debootstrap base, the images (network and disk), then
#                                      the node's containerd (a short Go build once the images are done)
# The three are bound by different resources, so running them together costs about the longest one.
# Each lane logs to $PREREQS_LOGS/<lane>.log (default /tmp/vlmpool-prereqs); a failed lane fails the
# whole (its log's tail is printed). Every cache these scripts fill is built under its own flock, so a
# second caller (another checkout, a developer's make) waits instead of building it twice.
#
# Sourced by .ci/run, which starts the three lanes, runs `make test` at once (its .venv and lint meanwhile;
# its k8s-bins step waits on the cpu lane's flock) and awaits the others only where it needs them.
#   bash hack/prereqs.sh [LANE...]     start the lanes (default: all), wait for all, fail if one failed
set -uo pipefail
PREREQS_LOGS=${PREREQS_LOGS:-/tmp/vlmpool-prereqs}
declare -A PREREQ_PID=() PREREQ_T0=()

prereq_cmd() {
  case $1 in
    cpu) echo "bash hack/k8s-bins.sh && bash hack/epp.sh" ;;
    vllm) echo "bash hack/vllm-env.sh" ;;
    node) echo "bash hack/node.sh images && bash hack/containerd-bins.sh" ;;
    *) echo "prereqs: unknown lane $1 (cpu, vllm, node)" >&2; return 2 ;;
  esac
}

# prereq_start LANE: start LANE in the background, its output in its log.
prereq_start() {
  local cmd; cmd=$(prereq_cmd "$1") || return 2
  mkdir -p "$PREREQS_LOGS"
  # Its own process group (setsid), so that stopping it stops its builds too.
  rm -f "$PREREQS_LOGS/$1.seconds"
  setsid bash -c "set -e; $cmd; echo \$SECONDS > '$PREREQS_LOGS/$1.seconds'" >"$PREREQS_LOGS/$1.log" 2>&1 </dev/null &
  PREREQ_PID[$1]=$! PREREQ_T0[$1]=$SECONDS
  echo "prereqs: $1 started (pid $!, log $PREREQS_LOGS/$1.log): $cmd" >&2
}

# prereq_wait LANE: wait for LANE; on failure print its log's tail and return its status.
prereq_wait() {
  local rc=0
  [ -n "${PREREQ_PID[$1]:-}" ] || { echo "prereqs: $1 was not started" >&2; return 2; }
  wait "${PREREQ_PID[$1]}" || rc=$?
  if [ $rc = 0 ]; then
    echo "prereqs: $1 done: it took $(cat "$PREREQS_LOGS/$1.seconds" 2>/dev/null || echo '?') s" >&2
  else
    echo "prereqs: $1 FAILED (exit $rc) after $((SECONDS - PREREQ_T0[$1])) s; the end of $PREREQS_LOGS/$1.log:" >&2
    tail -n 40 "$PREREQS_LOGS/$1.log" >&2
  fi
  return $rc
}

# On an early exit (a failed step, Ctrl-C), stop the lanes still running: their caches stay consistent
# (each is written to a stamp or a temporary name last), and the next run resumes them.
prereq_stop_all() {
  local lane pid
  for lane in "${!PREREQ_PID[@]}"; do
    pid=${PREREQ_PID[$lane]}
    kill -0 "$pid" 2>/dev/null && kill -TERM -- "-$pid" 2>/dev/null
  done
  return 0
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  cd "$(dirname "$0")/.."
  lanes=("$@"); [ ${#lanes[@]} -gt 0 ] || lanes=(cpu vllm node)
  trap prereq_stop_all INT TERM
  for l in "${lanes[@]}"; do prereq_start "$l" || exit 2; done
  rc=0
  for l in "${lanes[@]}"; do prereq_wait "$l" || rc=1; done
  echo "prereqs: all done in $SECONDS s (rc $rc)" >&2
  exit $rc
fi
