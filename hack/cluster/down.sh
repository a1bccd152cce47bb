#!/usr/bin/env bash
# Stop the local control plane (make cluster-down). Idempotent.
#
# Stops exactly the processes named by target/cluster/pids/*.pid (TERM, then
# KILL after a bounded wait), then removes the cluster's data: etcd data,
# certificates, pid files and the kubeconfig. Logs (target/cluster/logs/) and
# the binaries are kept.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

STOP_TIMEOUT=${CLUSTER_STOP_TIMEOUT:-20}
lock_state

stopped=()
for ((i = ${#COMPONENTS[@]} - 1; i >= 0; i--)); do
  name=${COMPONENTS[i]}
  if pid=$(component_pid "$name"); then
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$((SECONDS + STOP_TIMEOUT))
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then
      log "$name (pid $pid) still running after ${STOP_TIMEOUT}s; sending KILL"
      kill -KILL "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    stopped+=("$name")
  fi
  rm -f "$PIDS_DIR/$name.pid"
done

rm -rf "$ETCD_DATA_DIR" "$CERTS_DIR" "$PIDS_DIR" "$KUBECONFIG_FILE" "$KUBECONFIG_FILE.tmp"
if ((${#stopped[@]})); then
  log "stopped: ${stopped[*]}; removed etcd data, certificates and kubeconfig (logs kept in $LOGS_DIR)"
else
  log "no cluster processes were running; state removed (logs kept in $LOGS_DIR)"
fi
