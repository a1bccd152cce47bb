#!/usr/bin/env bash
# Build (or reuse) the control-plane binaries and link them into
# target/cluster/bin/.
#
#   etcd                     go.etcd.io/etcd/server/v3 (etcdmain.Main)
#   kube-apiserver           k8s.io/kubernetes/cmd/kube-apiserver
#   kube-controller-manager  k8s.io/kubernetes/cmd/kube-controller-manager
#   kube-scheduler           k8s.io/kubernetes/cmd/kube-scheduler
#   kubectl                  k8s.io/kubernetes/cmd/kubectl
#   kwok                     sigs.k8s.io/kwok/cmd/kwok
#   kueue                    sigs.k8s.io/kueue/cmd/kueue, with its CRDs and webhook
#                            manifests (cached in .../keelson/kueue-<v>/)
#   scheduler-plugins        sigs.k8s.io/scheduler-plugins/cmd/scheduler, a kube-scheduler with
#                            the Coscheduling plugin, for the gang test (cached in
#                            .../keelson/scheduler-plugins-<v>-k8s-<v>/)
#
# With the real node on (REAL_NODE=1; docs/real-node.md), also:
#
#   kubelet, kube-proxy      k8s.io/kubernetes/cmd/... (same module and cache dir)
#   crictl                   sigs.k8s.io/cri-tools/cmd/crictl
#   coredns                  github.com/coredns/coredns with the plugins the
#                            node uses (cached in .../keelson/node-crictl-<v>-coredns-<v>/)
#   kube-router              github.com/cloudnativelabs/kube-router/v2/cmd/kube-router, run
#                            firewall-only for NetworkPolicies (cached in .../keelson/kube-router-<v>/)
#
# Versions come from versions.env. Binaries are cached per user in
# ${XDG_CACHE_HOME:-~/.cache}/keelson/k8s-<v>-etcd-<v>-kwok-<v>/bin and only
# what is missing is built. If KUBEBUILDER_ASSETS points at a directory of
# binaries, those are used as they are and only the missing ones are built.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

command -v go >/dev/null 2>&1 || die "go is not on PATH; the control plane is built from Go modules (need go >= 1.26.0)"

export GOTOOLCHAIN=local
export CGO_ENABLED=0
export GOFLAGS="-mod=mod -buildvcs=false"
LDFLAGS_BASE="-s -w"

mkdir -p "$CACHE_BIN" "$BIN_DIR"
# One build at a time per cache directory (two checkouts may race).
exec 9>"$CACHE_DIR/.lock"
if ! flock -n 9; then
  log "another build holds $CACHE_DIR/.lock; waiting for it..."
  flock 9
fi

# Which binaries come from KUBEBUILDER_ASSETS.
from_assets() {
  [[ -n ${KUBEBUILDER_ASSETS:-} && -x ${KUBEBUILDER_ASSETS}/$1 ]]
}
if [[ -n ${KUBEBUILDER_ASSETS:-} ]]; then
  [[ -d $KUBEBUILDER_ASSETS ]] || die "KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS is not a directory"
  for b in etcd kube-apiserver kubectl; do
    from_assets "$b" || log "KUBEBUILDER_ASSETS has no executable $b; building it"
  done
fi

need_build() {
  local b=$1
  ! from_assets "$b" && [[ ! -x $CACHE_BIN/$b ]]
}

# Run a go build, logging to the cache dir; on failure show the tail.
gobuild() {
  local name=$1 dir=$2 ldflags=$3 pkg=$4 logf="$CACHE_DIR/build-$1.log" t0=$SECONDS
  if ! (cd "$dir" && go build -trimpath -ldflags="$ldflags" -o "$CACHE_BIN/.$name.tmp" "$pkg") >"$logf" 2>&1; then
    rm -f "$CACHE_BIN/.$name.tmp"
    tail -n 30 "$logf" >&2
    die "building $name failed; full log: $logf"
  fi
  mv -f "$CACHE_BIN/.$name.tmp" "$CACHE_BIN/$name"
  BUILT+=("$name")
  log "built $name in $((SECONDS - t0))s"
}

# go.mod of a module version from the module proxy/cache.
modfile() {
  local mod=$1 ver=$2 out
  out=$(cd "$CACHE_DIR" && go mod download -json "$mod@$ver" 2>&1) ||
    die "cannot download $mod@$ver: $out"
  sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p' <<<"$out"
}

build_kube() {
  local bins=() b
  for b in "$@"; do
    need_build "$b" && bins+=("$b")
  done
  ((${#bins[@]})) || return 0
  local dir="$CACHE_DIR/src/kubernetes" kmod
  mkdir -p "$dir"
  log "resolving k8s.io/kubernetes $KUBE_VERSION..."
  kmod=$(modfile k8s.io/kubernetes "$KUBE_VERSION")
  [[ -f $kmod ]] || die "no go.mod for k8s.io/kubernetes@$KUBE_VERSION"
  # k8s.io/kubernetes replaces its k8s.io/* staging modules with local
  # directories; outside that tree they are the published v0.<minor>.<patch> tags.
  local staging_ver="v0.${KUBE_VERSION#v1.}"
  {
    echo "module keelson.local/kube-build"
    echo
    grep -E '^(go|godebug) ' "$kmod"
    echo
    echo "require k8s.io/kubernetes $KUBE_VERSION"
    echo
    echo "replace ("
    sed -nE 's#^[[:space:]]*(k8s\.io/[A-Za-z0-9._-]+) => \./staging/src/.*#\t\1 => \1 '"$staging_ver"'#p' "$kmod"
    echo ")"
  } >"$dir/go.mod.new"
  grep -q 'k8s.io/apimachinery =>' "$dir/go.mod.new" || die "found no staging replace lines in $kmod"
  # Keep go.sum from a previous attempt when the module file is unchanged.
  if ! cmp -s "$dir/go.mod.new" "$dir/go.mod.in" 2>/dev/null; then
    cp "$dir/go.mod.new" "$dir/go.mod.in"
    cp "$dir/go.mod.new" "$dir/go.mod"
    rm -f "$dir/go.sum"
  fi
  rm -f "$dir/go.mod.new"
  local minor=${KUBE_VERSION#v1.}; minor=${minor%%.*}
  local ld="$LDFLAGS_BASE" p
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X $p.gitVersion=$KUBE_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
  done
  for b in "${bins[@]}"; do
    log "building $b $KUBE_VERSION (first run takes several minutes)..."
    gobuild "$b" "$dir" "$ld" "k8s.io/kubernetes/cmd/$b"
  done
}

build_etcd() {
  need_build etcd || return 0
  local dir="$CACHE_DIR/src/etcd" emod
  mkdir -p "$dir"
  emod=$(modfile go.etcd.io/etcd/server/v3 "$ETCD_VERSION")
  if [[ ! -f $dir/main.go ]] || ! grep -q "server/v3 $ETCD_VERSION\$" "$dir/go.mod" 2>/dev/null; then
    {
      echo "module keelson.local/etcd-build"
      echo
      grep -E '^go ' "$emod"
      echo
      echo "require go.etcd.io/etcd/server/v3 $ETCD_VERSION"
    } >"$dir/go.mod"
    rm -f "$dir/go.sum"
    cat >"$dir/main.go" <<'GO'
// Command etcd is the etcd server, built from go.etcd.io/etcd/server/v3.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
  fi
  log "building etcd $ETCD_VERSION (first run takes a few minutes)..."
  gobuild etcd "$dir" "$LDFLAGS_BASE" .
}

build_kwok() {
  need_build kwok || return 0
  local dir="$CACHE_DIR/src/kwok" wmod
  mkdir -p "$dir"
  wmod=$(modfile sigs.k8s.io/kwok "$KWOK_VERSION")
  if ! grep -q "sigs.k8s.io/kwok $KWOK_VERSION\$" "$dir/go.mod" 2>/dev/null; then
    {
      echo "module keelson.local/kwok-build"
      echo
      grep -E '^go ' "$wmod"
      echo
      echo "require sigs.k8s.io/kwok $KWOK_VERSION"
    } >"$dir/go.mod"
    rm -f "$dir/go.sum"
  fi
  log "building kwok $KWOK_VERSION (first run takes a few minutes)..."
  gobuild kwok "$dir" "$LDFLAGS_BASE -X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK_VERSION" sigs.k8s.io/kwok/cmd/kwok
}

T0=$SECONDS
BUILT=()
if [[ -f $CACHE_DIR/.complete && -z ${KUBEBUILDER_ASSETS:-} ]]; then
  : # everything cached
else
  build_etcd
  build_kube kube-apiserver kube-controller-manager kube-scheduler kubectl
  build_kwok
  all=1
  for b in "${ALL_BINARIES[@]}"; do [[ -x $CACHE_BIN/$b ]] || all=0; done
  ((all)) && date -u +%FT%TZ >"$CACHE_DIR/.complete"
  ((${#BUILT[@]} == 0)) || log "built ${BUILT[*]} in $((SECONDS - T0))s"
fi

# --- Kueue -----------------------------------------------------------------------
# The kueue binary, plus what its module source ships: the CRDs
# (config/components/crd/bases), the admission webhooks of Kueue's own API
# (the kueue.x-k8s.io entries of config/components/webhook/manifests.yaml)
# and the names of the CRDs whose conversion webhook Kueue's kustomization
# enables (the patches/webhook_in_<plural>.yaml it lists). up.sh points the
# webhooks at the local process (kueue.sh).
KUEUE_CACHE_BIN="$KUEUE_CACHE_DIR/bin"
# Bumped when what build_kueue writes into config/ changes, so that a cache made before is redone.
KUEUE_CONFIG_LAYOUT=2
build_kueue() {
  local dir="$KUEUE_CACHE_DIR/src/kueue" kmod src cfg="$KUEUE_CACHE_DIR/config"
  [[ -x $KUEUE_CACHE_BIN/kueue ]] && grep -qx "layout $KUEUE_CONFIG_LAYOUT" "$cfg/.complete" 2>/dev/null && return 0
  mkdir -p "$dir" "$KUEUE_CACHE_BIN"
  kmod=$(modfile sigs.k8s.io/kueue "$KUEUE_VERSION")
  src=$(cd "$CACHE_DIR" && go mod download -json "sigs.k8s.io/kueue@$KUEUE_VERSION" |
    sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p')
  [[ -d $src/config/components/crd/bases ]] || die "no config/components/crd/bases in sigs.k8s.io/kueue@$KUEUE_VERSION ($src)"
  if [[ ! -x $KUEUE_CACHE_BIN/kueue ]]; then
    if ! grep -q "sigs.k8s.io/kueue $KUEUE_VERSION\$" "$dir/go.mod" 2>/dev/null; then
      {
        echo "module keelson.local/kueue-build"
        echo
        grep -E '^go ' "$kmod"
        echo
        echo "require sigs.k8s.io/kueue $KUEUE_VERSION"
      } >"$dir/go.mod"
      rm -f "$dir/go.sum"
    fi
    log "building kueue $KUEUE_VERSION (first run takes several minutes)..."
    CACHE_BIN=$KUEUE_CACHE_BIN CACHE_DIR=$KUEUE_CACHE_DIR gobuild kueue "$dir" \
      "$LDFLAGS_BASE -X sigs.k8s.io/kueue/pkg/version.GitVersion=$KUEUE_VERSION" sigs.k8s.io/kueue/cmd/kueue
  fi
  rm -rf "$cfg"
  mkdir -p "$cfg/crds"
  cp "$src"/config/components/crd/bases/*.yaml "$cfg/crds/"
  chmod -R u+w "$cfg"
  # Each webhook entry runs from its "- admissionReviewVersions" line to its
  # "sideEffects" line; "---" separates the mutating list from the validating one.
  awk '/^---/ {n++; next}
       /^- admissionReviewVersions/ {buf = $0; next}
       {buf = buf "\n" $0}
       /^  sideEffects/ {if (buf ~ /path: \/(mutate|validate)-kueue-x-k8s-io-/) print buf > (n == 1 ? m : v); buf = ""}' \
    m="$cfg/mutating-webhooks.yaml" v="$cfg/validating-webhooks.yaml" "$src/config/components/webhook/manifests.yaml"
  [[ -s $cfg/mutating-webhooks.yaml && -s $cfg/validating-webhooks.yaml ]] ||
    die "found no kueue.x-k8s.io webhooks in $src/config/components/webhook/manifests.yaml"
  # Only the patches the kustomization lists: ResourceFlavor's is there but commented out (its
  # types have no conversion).
  sed -n 's#^- path: patches/webhook_in_\(.*\)\.yaml$#\1.kueue.x-k8s.io#p' \
    "$src/config/components/crd/kustomization.yaml" >"$cfg/conversion-crds.txt"
  [[ -s $cfg/conversion-crds.txt ]] || die "found no conversion webhook patch in $src/config/components/crd/kustomization.yaml"
  echo "layout $KUEUE_CONFIG_LAYOUT" >"$cfg/.complete"
}
mkdir -p "$KUEUE_CACHE_DIR"
exec 7>"$KUEUE_CACHE_DIR/.lock"
if ! flock -n 7; then
  log "another build holds $KUEUE_CACHE_DIR/.lock; waiting for it..."
  flock 7
fi
BUILT=()
build_kueue
exec 7>&-
[[ -x $KUEUE_CACHE_BIN/kueue ]] || die "missing kueue (expected $KUEUE_CACHE_BIN/kueue)"
ln -sfn "$KUEUE_CACHE_BIN/kueue" "$BIN_DIR/kueue"

# --- scheduler-plugins -------------------------------------------------------------
# The kube-scheduler of sigs.k8s.io/scheduler-plugins, for its Coscheduling plugin:
# tests/integration/gang.rs runs it beside the cluster's own scheduler. Its go.mod
# replaces the Kubernetes staging modules, which `go install module@version`
# refuses, so it is built in a copy of its module directory. There the replaces of
# k8s.io/kubernetes and its staging modules move to KUBE_VERSION, the control
# plane's own: the Go build cache then already holds those packages, and the build
# takes minutes instead of about 16 (2 cores, cold).
COSCHEDULER_CACHE_BIN="$COSCHEDULER_CACHE_DIR/bin"
build_coscheduler() {
  [[ -x $COSCHEDULER_CACHE_BIN/kube-scheduler ]] && return 0
  local src="$COSCHEDULER_CACHE_DIR/src/scheduler-plugins" mod
  local minor=${KUBE_VERSION#v1.}; minor=${minor%%.*}
  mkdir -p "$COSCHEDULER_CACHE_BIN" "${src%/*}"
  mod=$(cd "$COSCHEDULER_CACHE_DIR" && go mod download -json "sigs.k8s.io/scheduler-plugins@$SCHEDULER_PLUGINS_VERSION" |
    sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p')
  [[ -d $mod ]] || die "cannot download sigs.k8s.io/scheduler-plugins@$SCHEDULER_PLUGINS_VERSION"
  rm -rf "$src"
  cp -r "$mod" "$src"
  chmod -R u+w "$src"
  sed -i -E "s#^([[:space:]]*(replace )?k8s\.io/kubernetes => k8s\.io/kubernetes) v1\.$minor\.[0-9]+\$#\1 $KUBE_VERSION#;
    s#^([[:space:]]*(replace )?k8s\.io/[A-Za-z0-9._-]+ => k8s\.io/[A-Za-z0-9._-]+) v0\.$minor\.[0-9]+\$#\1 v0.${KUBE_VERSION#v1.}#" \
    "$src/go.mod"
  grep -q "k8s.io/kubernetes => k8s.io/kubernetes $KUBE_VERSION\$" "$src/go.mod" ||
    die "sigs.k8s.io/scheduler-plugins@$SCHEDULER_PLUGINS_VERSION does not build against Kubernetes 1.$minor"
  log "building scheduler-plugins $SCHEDULER_PLUGINS_VERSION against $KUBE_VERSION..."
  CACHE_BIN=$COSCHEDULER_CACHE_BIN CACHE_DIR=$COSCHEDULER_CACHE_DIR gobuild kube-scheduler "$src" "$LDFLAGS_BASE" ./cmd/scheduler
  rm -rf "$src"
}
mkdir -p "$COSCHEDULER_CACHE_DIR"
exec 7>"$COSCHEDULER_CACHE_DIR/.lock"
if ! flock -n 7; then
  log "another build holds $COSCHEDULER_CACHE_DIR/.lock; waiting for it..."
  flock 7
fi
build_coscheduler
exec 7>&-
ln -sfn "$COSCHEDULER_CACHE_BIN/kube-scheduler" "$BIN_DIR/scheduler-plugins"

# --- real node -----------------------------------------------------------------
# Built only when the real node is on; kubelet and kube-proxy share the
# control plane's k8s.io/kubernetes build directory (and its lock).
build_crictl() {
  [[ -x $NODE_CACHE_BIN/crictl ]] || from_assets crictl && return 0
  local dir="$NODE_CACHE_DIR/src/crictl"
  mkdir -p "$dir"
  modfile sigs.k8s.io/cri-tools "$CRICTL_VERSION" >/dev/null
  if ! grep -q "sigs.k8s.io/cri-tools $CRICTL_VERSION\$" "$dir/go.mod" 2>/dev/null; then
    printf 'module keelson.local/crictl-build\n\ngo 1.24.1\n\nrequire sigs.k8s.io/cri-tools %s\n' "$CRICTL_VERSION" >"$dir/go.mod"
    rm -f "$dir/go.sum"
  fi
  log "building crictl $CRICTL_VERSION..."
  CACHE_BIN=$NODE_CACHE_BIN CACHE_DIR=$NODE_CACHE_DIR gobuild crictl "$dir" \
    "$LDFLAGS_BASE -X sigs.k8s.io/cri-tools/pkg/version.Version=$CRICTL_VERSION" sigs.k8s.io/cri-tools/cmd/crictl
}

# CoreDNS with only the plugins the node's Corefile uses (node-up.sh): the
# full plugin set pulls in every cloud SDK.
build_coredns() {
  [[ -x $NODE_CACHE_BIN/coredns ]] || from_assets coredns && return 0
  local dir="$NODE_CACHE_DIR/src/coredns" cmod
  mkdir -p "$dir"
  cmod=$(modfile github.com/coredns/coredns "$COREDNS_VERSION")
  if ! grep -q "github.com/coredns/coredns $COREDNS_VERSION\$" "$dir/go.mod" 2>/dev/null; then
    {
      echo "module keelson.local/coredns-build"
      echo
      grep -E '^go ' "$cmod"
      echo
      echo "require github.com/coredns/coredns $COREDNS_VERSION"
    } >"$dir/go.mod"
    rm -f "$dir/go.sum"
    cat >"$dir/main.go" <<'GO'
// Command coredns is CoreDNS with the plugins the keelson real node uses.
package main

import (
	_ "github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loadbalance"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
	_ "github.com/coredns/coredns/plugin/template"
)

func main() { coremain.Run() }
GO
    (cd "$dir" && go mod tidy) >"$NODE_CACHE_DIR/build-coredns-tidy.log" 2>&1 ||
      { tail -n 20 "$NODE_CACHE_DIR/build-coredns-tidy.log" >&2; die "go mod tidy for coredns failed"; }
  fi
  log "building coredns $COREDNS_VERSION (first run takes a few minutes)..."
  CACHE_BIN=$NODE_CACHE_BIN CACHE_DIR=$NODE_CACHE_DIR gobuild coredns "$dir" \
    "$LDFLAGS_BASE -X github.com/coredns/coredns/coremain.GitCommit=$COREDNS_VERSION" .
}

# kube-router, for NetworkPolicy enforcement (firewall only; docs/real-node.md).
KUBE_ROUTER_CACHE_BIN="$KUBE_ROUTER_CACHE_DIR/bin"
build_kube_router() {
  [[ -x $KUBE_ROUTER_CACHE_BIN/kube-router ]] || from_assets kube-router && return 0
  local dir="$KUBE_ROUTER_CACHE_DIR/src/kube-router" rmod p ld="$LDFLAGS_BASE"
  mkdir -p "$dir" "$KUBE_ROUTER_CACHE_BIN"
  rmod=$(modfile github.com/cloudnativelabs/kube-router/v2 "$KUBE_ROUTER_VERSION")
  if ! grep -q "github.com/cloudnativelabs/kube-router/v2 $KUBE_ROUTER_VERSION\$" "$dir/go.mod" 2>/dev/null; then
    {
      echo "module keelson.local/kube-router-build"
      echo
      grep -E '^go ' "$rmod"
      echo
      echo "require github.com/cloudnativelabs/kube-router/v2 $KUBE_ROUTER_VERSION"
    } >"$dir/go.mod"
    rm -f "$dir/go.sum"
  fi
  p=github.com/cloudnativelabs/kube-router/v2/pkg/version
  ld+=" -X $p.Version=$KUBE_ROUTER_VERSION"
  log "building kube-router $KUBE_ROUTER_VERSION (first run takes a few minutes)..."
  CACHE_BIN=$KUBE_ROUTER_CACHE_BIN CACHE_DIR=$KUBE_ROUTER_CACHE_DIR gobuild kube-router "$dir" "$ld" \
    github.com/cloudnativelabs/kube-router/v2/cmd/kube-router
}

NODE_CACHE_BIN="$NODE_CACHE_DIR/bin"
if [[ $REAL_NODE == 1 ]]; then
  T1=$SECONDS
  BUILT=()
  build_kube kubelet kube-proxy
  mkdir -p "$NODE_CACHE_BIN"
  exec 7>"$NODE_CACHE_DIR/.lock"
  if ! flock -n 7; then
    log "another build holds $NODE_CACHE_DIR/.lock; waiting for it..."
    flock 7
  fi
  build_crictl
  build_coredns
  exec 7>&-
  mkdir -p "$KUBE_ROUTER_CACHE_DIR"
  exec 7>"$KUBE_ROUTER_CACHE_DIR/.lock"
  if ! flock -n 7; then
    log "another build holds $KUBE_ROUTER_CACHE_DIR/.lock; waiting for it..."
    flock 7
  fi
  build_kube_router
  exec 7>&-
  ((${#BUILT[@]} == 0)) || log "built ${BUILT[*]} in $((SECONDS - T1))s"
  for b in "${NODE_BINARIES[@]}"; do
    if from_assets "$b"; then
      src="$KUBEBUILDER_ASSETS/$b"
    elif [[ $b == kubelet || $b == kube-proxy ]]; then
      src="$CACHE_BIN/$b"
    elif [[ $b == kube-router ]]; then
      src="$KUBE_ROUTER_CACHE_BIN/$b"
    else
      src="$NODE_CACHE_BIN/$b"
    fi
    [[ -x $src ]] || die "missing $b (expected $src)"
    ln -sfn "$src" "$BIN_DIR/$b"
  done
fi

if [[ -n ${KUBEBUILDER_ASSETS:-} ]]; then
  used=()
  for b in "${ALL_BINARIES[@]}"; do from_assets "$b" && used+=("$b"); done
  log "from KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS: ${used[*]:-nothing}"
fi
for b in "${ALL_BINARIES[@]}"; do
  if from_assets "$b"; then
    src="$KUBEBUILDER_ASSETS/$b"
  else
    src="$CACHE_BIN/$b"
  fi
  [[ -x $src ]] || die "missing $b (expected $src)"
  ln -sfn "$src" "$BIN_DIR/$b"
done
log "binaries ready in $BIN_DIR (cache: $CACHE_DIR)"
