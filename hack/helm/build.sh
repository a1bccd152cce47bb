#!/usr/bin/env bash
# Build (or reuse) helm from its Go module and link it into target/cluster/bin/.
#
#   hack/helm/build.sh          build once into the per-user cache, link
#                               target/cluster/bin/helm, print the binary's path
#
# helm.sh/helm/v4 at HELM_VERSION (cmd/helm), built with `go install
# module@version`, so the dependency versions are exactly the ones in helm's
# own go.mod/go.sum. The binary is cached per user in
# ${XDG_CACHE_HOME:-~/.cache}/keelson/helm-<version>/bin/helm and shared by
# every checkout; the build log is beside it (build.log).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../cluster/lib.sh"

log() { printf '[helm] %s\n' "$*" >&2; }
die() { printf '[helm] ERROR: %s\n' "$*" >&2; exit 1; }
trap 'printf "[helm] ERROR: %s:%s: \"%s\" failed (exit %s)\n" "${BASH_SOURCE[0]##*/}" "$LINENO" "$BASH_COMMAND" "$?" >&2' ERR

# Pinned; override with HELM_VERSION=... for a one-off try.
: "${HELM_VERSION:=v4.3.2}"
HELM_MODULE=helm.sh/helm/v4
HELM_CACHE_DIR="$CACHE_ROOT/helm-$HELM_VERSION"
HELM_BIN="$HELM_CACHE_DIR/bin/helm"

link() {
  mkdir -p "$BIN_DIR"
  ln -sfn "$HELM_BIN" "$BIN_DIR/helm"
  echo "$HELM_BIN"
}

if [[ -x $HELM_BIN ]]; then
  link
  exit 0
fi

command -v go >/dev/null 2>&1 || die "go is not on PATH; helm is built from its Go module (helm $HELM_VERSION needs go >= 1.26.0)"
mkdir -p "$HELM_CACHE_DIR/bin"
# One build at a time per cache directory (two checkouts or test binaries may race).
exec 9>"$HELM_CACHE_DIR/.lock"
if ! flock -n 9; then
  log "another build holds $HELM_CACHE_DIR/.lock; waiting for it..."
  flock 9
fi
if [[ ! -x $HELM_BIN ]]; then
  logf="$HELM_CACHE_DIR/build.log" t0=$SECONDS tmp="$HELM_CACHE_DIR/.gobin"
  log "building helm $HELM_VERSION from $HELM_MODULE (first run takes a few minutes)..."
  rm -rf "$tmp"
  ldflags="-s -w -X $HELM_MODULE/internal/version.version=$HELM_VERSION"
  ldflags+=" -X $HELM_MODULE/internal/version.metadata= -X $HELM_MODULE/internal/version.gitTreeState=clean"
  if ! (cd "$HELM_CACHE_DIR" && GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-buildvcs=false GOBIN="$tmp" \
    go install -trimpath -ldflags="$ldflags" "$HELM_MODULE/cmd/helm@$HELM_VERSION") >"$logf" 2>&1; then
    rm -rf "$tmp"
    tail -n 30 "$logf" >&2
    die "building helm failed; full log: $logf"
  fi
  mv -f "$tmp/helm" "$HELM_BIN"
  rm -rf "$tmp"
  log "built helm $HELM_VERSION in $((SECONDS - t0))s"
fi
exec 9>&-
link
