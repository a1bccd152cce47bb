#!/usr/bin/env bash
# Build (or reuse) the scheduler-plugins kube-scheduler, the one with the Coscheduling plugin, from
# its Go module, and print the binary's path.
#
#   hack/scheduler-plugins/build.sh
#
# sigs.k8s.io/scheduler-plugins at SCHEDULER_PLUGINS_VERSION (cmd/scheduler). v0.34.1-devel is the
# version the Go module proxy serves here (Kueue v0.17.0 depends on it); the proxy refuses v0.35.0.
# Its go.mod replaces the Kubernetes staging modules, which `go install module@version` refuses, so
# the module is downloaded and built in a copy of its own directory, with its own go.mod and go.sum.
# Cached per user in ${XDG_CACHE_HOME:-~/.cache}/keelson/scheduler-plugins-<version>/bin/kube-scheduler
# (about 16 min cold on 2 cores); the build log is beside it. Used by the opt-in real-scheduler test
# in tests/integration/gang.rs (docs/api.md, Gang scheduling).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../cluster/lib.sh"

log() { printf '[scheduler-plugins] %s\n' "$*" >&2; }
die() { printf '[scheduler-plugins] ERROR: %s\n' "$*" >&2; exit 1; }

: "${SCHEDULER_PLUGINS_VERSION:=v0.34.1-devel}"
MODULE=sigs.k8s.io/scheduler-plugins
DIR="$CACHE_ROOT/scheduler-plugins-$SCHEDULER_PLUGINS_VERSION"
BIN="$DIR/bin/kube-scheduler"

if [[ -x $BIN ]]; then
  echo "$BIN"
  exit 0
fi
command -v go >/dev/null 2>&1 || die "go is not on PATH"
mkdir -p "$DIR/bin"
exec 9>"$DIR/.lock"
if ! flock -n 9; then
  log "another build holds $DIR/.lock; waiting for it..."
  flock 9
fi
if [[ ! -x $BIN ]]; then
  logf="$DIR/build.log" t0=$SECONDS src="$DIR/src"
  log "building $MODULE $SCHEDULER_PLUGINS_VERSION (cmd/scheduler; first run takes about 16 min)..."
  moddir=$(cd "$DIR" && GOTOOLCHAIN=local GOFLAGS=-mod=mod go mod download -json "$MODULE@$SCHEDULER_PLUGINS_VERSION" |
    sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
  [[ -d $moddir ]] || die "go mod download $MODULE@$SCHEDULER_PLUGINS_VERSION gave no directory"
  rm -rf "$src"
  cp -r "$moddir" "$src"
  chmod -R u+w "$src"
  if ! (cd "$src" && GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS="-mod=mod -buildvcs=false" \
    go build -trimpath -ldflags="-s -w" -o "$BIN.tmp" ./cmd/scheduler) >"$logf" 2>&1; then
    tail -n 30 "$logf" >&2
    die "building failed; full log: $logf"
  fi
  mv -f "$BIN.tmp" "$BIN"
  rm -rf "$src"
  log "built in $((SECONDS - t0))s"
fi
exec 9>&-
echo "$BIN"
