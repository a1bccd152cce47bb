# Shared helpers for hack/cluster scripts. Source it; do not execute it.
# shellcheck shell=bash disable=SC2034  # variables are used by the scripts that source this file

CLUSTER_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$CLUSTER_DIR/../.." && pwd)"

# Apply versions.env: a value only takes effect when the variable is not
# already set in the environment, so `APISERVER_PORT=26443 make cluster` works.
load_versions() {
  local k v
  while IFS='=' read -r k v; do
    [[ $k =~ ^[A-Z_][A-Z0-9_]*$ ]] || continue
    if [[ -z ${!k+x} ]]; then
      export "$k=$v"
    fi
  done <"$CLUSTER_DIR/versions.env"
}
load_versions
# Kueue's ports follow the apiserver's (versions.env).
: "${KUEUE_WEBHOOK_PORT:=$((APISERVER_PORT + 3000))}"
: "${KUEUE_HEALTH_PORT:=$((APISERVER_PORT + 1638))}"
export KUEUE_WEBHOOK_PORT KUEUE_HEALTH_PORT

# Where everything for this checkout lives (all git-ignored under target/).
: "${CLUSTER_STATE:=$REPO_ROOT/target/cluster}"
BIN_DIR="$CLUSTER_STATE/bin"
# Per-user build cache keyed by every pinned version, shared by all
# checkouts of the project on the machine.
CACHE_ROOT="${XDG_CACHE_HOME:-$HOME/.cache}/keelson"
CACHE_KEY="k8s-${KUBE_VERSION}-etcd-${ETCD_VERSION}-kwok-${KWOK_VERSION}"
CACHE_DIR="$CACHE_ROOT/$CACHE_KEY"
CACHE_BIN="$CACHE_DIR/bin"

ALL_BINARIES=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kwok)
# Kueue in its own cache directory: its binary, and the CRDs and webhook
# manifests taken from its module source (build.sh).
KUEUE_CACHE_DIR="$CACHE_ROOT/kueue-${KUEUE_VERSION}"
# The scheduler-plugins scheduler, built against KUBE_VERSION (build.sh).
COSCHEDULER_CACHE_DIR="$CACHE_ROOT/scheduler-plugins-${SCHEDULER_PLUGINS_VERSION}-k8s-${KUBE_VERSION}"

# An unexpected failure names the script line instead of exiting silently.
set -o errtrace
trap 'printf "[cluster] ERROR: %s:%s: \"%s\" failed (exit %s)\n" "${BASH_SOURCE[0]##*/}" "$LINENO" "$BASH_COMMAND" "$?" >&2' ERR

log() { printf '[cluster] %s\n' "$*" >&2; }
die() { printf '[cluster] ERROR: %s\n' "$*" >&2; exit 1; }

CERTS_DIR="$CLUSTER_STATE/certs"
PIDS_DIR="$CLUSTER_STATE/pids"
LOGS_DIR="$CLUSTER_STATE/logs"
ETCD_DATA_DIR="$CLUSTER_STATE/etcd"
KUBECONFIG_FILE="$CLUSTER_STATE/kubeconfig"
APISERVER_URL="https://${CLUSTER_HOST}:${APISERVER_PORT}"
# Start order; down.sh stops them in reverse.
COMPONENTS=(etcd kube-apiserver kube-controller-manager kube-scheduler kwok kueue)

# Serialise up.sh/down.sh on one checkout.
lock_state() {
  mkdir -p "$CLUSTER_STATE"
  exec 8>"$CLUSTER_STATE/.lock"
  if ! flock -n 8; then
    log "waiting for another up.sh/down.sh on $CLUSTER_STATE..."
    flock 8
  fi
}

# PID of a component from its pid file, if that process is still that
# component (a recycled PID of some other program does not count).
component_pid() {
  local name=$1 pidf="$PIDS_DIR/$1.pid" pid exe
  [[ -s $pidf ]] || return 1
  pid=$(<"$pidf")
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || return 1
  exe=${exe% (deleted)}
  [[ ${exe##*/} == "$name" ]] || return 1
  echo "$pid"
}

# True while PID runs (a zombie waiting to be reaped by its parent has exited).
alive() {
  local state
  state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
  [[ -n $state && $state != Z && $state != X ]]
}

# Stop one component by its pid file: TERM, then KILL after a bounded wait.
# Returns 1 when the component was not running.
stop_component() {
  local name=$1 timeout=${CLUSTER_STOP_TIMEOUT:-20} pid deadline
  pid=$(component_pid "$name") || { rm -f "$PIDS_DIR/$name.pid"; return 1; }
  log "stopping $name (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  deadline=$((SECONDS + timeout))
  while alive "$pid" && ((SECONDS < deadline)); do sleep 0.1; done
  if alive "$pid"; then
    log "$name (pid $pid) still running after ${timeout}s; sending KILL"
    kill -KILL "$pid" 2>/dev/null || true
    for _ in $(seq 50); do alive "$pid" || break; sleep 0.1; done
  fi
  rm -f "$PIDS_DIR/$name.pid"
}

# Fingerprint of the kwok stage set a running kwok was started with.
KWOK_STAGES="$CLUSTER_DIR/kwok/stages.yaml"
stages_sum() { sha256sum "$KWOK_STAGES" | cut -d' ' -f1; }

# --- real node (node-up.sh, node-down.sh, docs/real-node.md) -----------------
# On when REAL_NODE=1 (opt-in; .ci/run sets it in CI).
: "${REAL_NODE:=0}"
NODE_BINARIES=(kubelet kube-proxy crictl coredns kube-router)
# crictl and CoreDNS are cached beside the control plane, keyed by their versions.
NODE_CACHE_DIR="$CACHE_ROOT/node-crictl-${CRICTL_VERSION}-coredns-${COREDNS_VERSION}"
# kube-router (NetworkPolicy enforcement) in its own cache directory.
KUBE_ROUTER_CACHE_DIR="$CACHE_ROOT/kube-router-${KUBE_ROUTER_VERSION}"
# Host paths of the node. The kubelet root and containerd root sit under
# /var/lib/keelson so the socket paths stay short whatever the checkout path.
NODE_STATE="$CLUSTER_STATE/node"
NODE_VAR=/var/lib/keelson
KUBELET_ROOT="$NODE_VAR/kubelet"
CONTAINERD_ROOT="$NODE_VAR/containerd"
CONTAINERD_STATE=/run/keelson-containerd
CONTAINERD_SOCK="$CONTAINERD_STATE/containerd.sock"
CNI_CONF_DIR="$NODE_VAR/cni/net.d"
CNI_BIN_DIR=/usr/lib/cni
CNI_NETWORK=keelson
PAUSE_IMAGE=keelson.dev/pause:dev
NODE_COMPONENTS=(containerd coredns kube-proxy kube-router kubelet)
REAL_NODE_TAINT="keelson.dev/real-node=true:NoSchedule"
REAL_NODE_LABEL="keelson.dev/real-node=true"
# Kernel settings the kubelet and kube-proxy change, and the ones the node
# needs: node-up.sh records them in $NODE_STATE/sysctl.saved, node-down.sh
# writes the recorded values back.
NODE_SYSCTLS=(net.ipv4.ip_forward net.bridge.bridge-nf-call-iptables net.bridge.bridge-nf-call-ip6tables
  net.ipv4.conf.all.route_localnet vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops
  kernel.keys.root_maxkeys kernel.keys.root_maxbytes)
# The interface that carries REAL_NODE_IP: a dummy device, or where the kernel
# has no dummy driver, an ifb device (it drops whatever is routed to it, as a
# dummy does; the address on it is local either way).
ensure_node_iface() {
  if ! ip link show "$REAL_NODE_IFACE" >/dev/null 2>&1; then
    ip link add "$REAL_NODE_IFACE" type dummy 2>/dev/null || ip link add "$REAL_NODE_IFACE" type ifb ||
      die "cannot create interface $REAL_NODE_IFACE (neither dummy nor ifb devices)"
    log "added interface $REAL_NODE_IFACE ($(ip -d link show "$REAL_NODE_IFACE" | awk 'NR==3 {print $1}')) with $REAL_NODE_IP/32"
  fi
  ip link set "$REAL_NODE_IFACE" up
  ip addr replace "$REAL_NODE_IP/32" dev "$REAL_NODE_IFACE"
}
