#!/usr/bin/env bash
# Stop the local control plane (make cluster-down). Idempotent.
#
# Takes a real node down first (node-down.sh; docs/real-node.md), then
# stops exactly the processes named by target/cluster/pids/*.pid (kueue first) (TERM, then
# KILL after a bounded wait), then removes the cluster's data: etcd data,
# certificates, pid files and the kubeconfig. Logs (target/cluster/logs/) and
# the binaries are kept.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

lock_state

# The real node first (kubelet, pods, kube-proxy, containerd; host restored).
KEELSON_STATE_LOCKED=1 "$CLUSTER_DIR/node-down.sh"

stopped=()
for ((i = ${#COMPONENTS[@]} - 1; i >= 0; i--)); do
  if stop_component "${COMPONENTS[i]}"; then
    stopped+=("${COMPONENTS[i]}")
  fi
done

rm -rf "$ETCD_DATA_DIR" "$CERTS_DIR" "$PIDS_DIR" "$KUBECONFIG_FILE" "$KUBECONFIG_FILE.tmp" "$CLUSTER_STATE/kueue"
if ((${#stopped[@]})); then
  log "stopped: ${stopped[*]}; removed etcd data, certificates and kubeconfig (logs kept in $LOGS_DIR)"
else
  log "no cluster processes were running; state removed (logs kept in $LOGS_DIR)"
fi
