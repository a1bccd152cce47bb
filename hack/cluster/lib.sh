# Shared helpers for hack/cluster scripts. Source it; do not execute it.
# shellcheck shell=bash

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

log() { printf '[cluster] %s\n' "$*" >&2; }
die() { printf '[cluster] ERROR: %s\n' "$*" >&2; exit 1; }
