#!/usr/bin/env bash
# The benchmark anchor: the Kubeflow training-operator (PyTorchJob controller only),
# built from its Go module at a pinned release and run out of cluster against the
# local cluster (hack/cluster).
#
#   anchor.sh build          build (or reuse) the binary and its PyTorchJob CRD
#   anchor.sh crds           server-side apply the PyTorchJob CRD, wait until Established
#   anchor.sh start LOGFILE  start the operator (log appended to LOGFILE), wait until it reconciles
#   anchor.sh stop           TERM (KILL after 10 s) the process in target/bench/anchor.pid
#   anchor.sh status         pid, ports and RSS of the running anchor
#   anchor.sh manifest NAME  print hack/bench/pytorchjob-4.yaml as PyTorchJob NAME
#   anchor.sh clean          stop, then delete the namespace ANCHOR_NAMESPACE and the CRD
#                            (and with it every PyTorchJob)
#
# Version: TRAINING_OPERATOR_VERSION (hack/cluster/versions.env). The binary is
# cached per user in ${XDG_CACHE_HOME:-~/.cache}/keelson/training-operator-<v>/
# (bin/training-operator, crds/kubeflow.org_pytorchjobs.yaml) and linked at
# target/bench/bin/training-operator.
#
# How it runs (flags and setup, see start below):
#   --enable-scheme=pytorchjob    only the PyTorchJob controller (and its validating webhook)
#   no --gang-scheduler-name      no gang scheduling (no PodGroups)
#   --leader-elect=false          (the default)
#   --metrics-bind-address, --health-probe-bind-address, --webhook-server-port
#                                 free ports (metrics and probes on 127.0.0.1; the webhook
#                                 server has no host flag and listens on every address)
#   client QPS 20 / burst 30, 1 worker (--controller-threads=1), zap development logging
#   (console, debug level): the binary's defaults, as its release manifests deploy it.
# On SIGTERM v1.8.1 shuts down and then panics ("close of closed channel", main.go:172:
# main closes the ready channel the rotator already closed); stop ignores that.
# v1.8.x always starts a cert rotator and a webhook server and registers the controllers
# only once the rotator says the certificates are ready. The rotator needs (1) a Secret
# $MY_POD_NAMESPACE/training-operator-webhook-cert to exist (it only updates it) and (2) a
# file /tmp/k8s-webhook-server/serving-certs/tls.crt (in cluster: the Secret mounted there).
# A missing ValidatingWebhookConfiguration is only logged, so none is installed and the
# API server never calls the webhook. start creates the namespace ANCHOR_NAMESPACE with an
# empty Secret, and writes a self-signed pair into target/bench/webhook-certs/serving-certs.
# That directory is bind-mounted on /tmp/k8s-webhook-server in a private mount namespace
# (unshare) when the machine allows it, else the pair is written to the shared path.
#
# Environment: ANCHOR_KUBECONFIG (default target/cluster/kubeconfig), ANCHOR_NAMESPACE
# (anchor-system), ANCHOR_PORT_BASE (18440: the first port tried for the three listeners),
# ANCHOR_METRICS_PORT, ANCHOR_PROBE_PORT, ANCHOR_WEBHOOK_PORT (fixed ports instead),
# ANCHOR_START_TIMEOUT (60 s), ANCHOR_STOP_TIMEOUT (10 s), ANCHOR_ARGS (extra operator flags).
# Files: target/bench/anchor.pid, target/bench/anchor.env (PID, ports, log file).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../cluster/lib.sh"

trap 'printf "[anchor] ERROR: %s:%s: \"%s\" failed (exit %s)\n" "${BASH_SOURCE[0]##*/}" "$LINENO" "$BASH_COMMAND" "$?" >&2' ERR
log() { printf '[anchor] %s\n' "$*" >&2; }
die() { printf '[anchor] ERROR: %s\n' "$*" >&2; exit 1; }

TO_MODULE=github.com/kubeflow/training-operator
TO_PKG=$TO_MODULE/cmd/training-operator.v1
TO_VERSION=$TRAINING_OPERATOR_VERSION
TO_CACHE_DIR="$CACHE_ROOT/training-operator-$TO_VERSION"
TO_CACHE_BIN="$TO_CACHE_DIR/bin/training-operator"
CRD_FILE=kubeflow.org_pytorchjobs.yaml
CRD_NAME=pytorchjobs.kubeflow.org
TO_CACHE_CRD="$TO_CACHE_DIR/crds/$CRD_FILE"

BENCH_STATE="$REPO_ROOT/target/bench"
ANCHOR_BIN="$BENCH_STATE/bin/training-operator"
PID_FILE="$BENCH_STATE/anchor.pid"
ENV_FILE="$BENCH_STATE/anchor.env"
# Where the operator looks for its webhook serving pair (fixed in its source and in
# controller-runtime's default), and this checkout's copy of it.
WEBHOOK_ROOT=/tmp/k8s-webhook-server
PRIVATE_WEBHOOK_ROOT="$BENCH_STATE/webhook-certs"
WEBHOOK_SECRET=training-operator-webhook-cert
WEBHOOK_SERVICE=training-operator

# The local cluster's, whatever KUBECONFIG says (never a cluster it happens to point at).
export KUBECONFIG=${ANCHOR_KUBECONFIG:-$KUBECONFIG_FILE}
ANCHOR_NAMESPACE=${ANCHOR_NAMESPACE:-anchor-system}
KUBECTL=("$BIN_DIR/kubectl" --request-timeout=20s)

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2
  exit 2
}

# --- build -------------------------------------------------------------------
cmd_build() {
  if [[ -f $TO_CACHE_DIR/.complete && -x $TO_CACHE_BIN && -f $TO_CACHE_CRD ]]; then
    link_build
    return 0
  fi
  command -v go >/dev/null 2>&1 || die "go is not on PATH; the anchor is built from the Go module $TO_MODULE@$TO_VERSION"
  mkdir -p "$TO_CACHE_DIR/bin" "$TO_CACHE_DIR/crds"
  # One build at a time per cache directory (two checkouts may race).
  exec 9>"$TO_CACHE_DIR/.lock"
  if ! flock -n 9; then
    log "another build holds $TO_CACHE_DIR/.lock; waiting for it..."
    flock 9
  fi
  if [[ -f $TO_CACHE_DIR/.complete && -x $TO_CACHE_BIN && -f $TO_CACHE_CRD ]]; then
    exec 9>&-
    link_build
    return 0
  fi

  local t0=$SECONDS out dir gomod logf="$TO_CACHE_DIR/build.log"
  # Plain module-mode build with the toolchain on PATH (or the one GOTOOLCHAIN names).
  export GOTOOLCHAIN=${GOTOOLCHAIN:-local} CGO_ENABLED=0 GOFLAGS=
  log "resolving $TO_MODULE@$TO_VERSION..."
  out=$(cd "$TO_CACHE_DIR" && go mod download -json "$TO_MODULE@$TO_VERSION" 2>&1) ||
    die "cannot download $TO_MODULE@$TO_VERSION: $out"
  dir=$(sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p' <<<"$out")
  gomod=$(sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p' <<<"$out")
  [[ -d $dir && -f $gomod ]] || die "go mod download gave no module directory for $TO_MODULE@$TO_VERSION: $out"
  # `go install pkg@version` builds with exactly the release's go.mod; it refuses a
  # go.mod with replace directives (a later release may need a wrapper module instead).
  if grep -qE '^[[:space:]]*replace([[:space:]]|\()' "$gomod"; then
    die "$TO_MODULE@$TO_VERSION has replace directives in its go.mod; go install cannot build it as is"
  fi

  local src_crd="$dir/manifests/base/crds/$CRD_FILE"
  [[ -f $src_crd ]] || die "$TO_MODULE@$TO_VERSION has no manifests/base/crds/$CRD_FILE"
  install -m 0644 "$src_crd" "$TO_CACHE_CRD.tmp"
  mv -f "$TO_CACHE_CRD.tmp" "$TO_CACHE_CRD"

  log "building training-operator $TO_VERSION (first run takes a few minutes)..."
  local gobin="$TO_CACHE_DIR/bin/.install"
  rm -rf "$gobin"
  if ! (cd "$TO_CACHE_DIR" && GOBIN=$gobin go install -trimpath -ldflags="-s -w" "$TO_PKG@$TO_VERSION") >"$logf" 2>&1; then
    rm -rf "$gobin"
    tail -n 30 "$logf" >&2
    die "building training-operator $TO_VERSION failed; full log: $logf"
  fi
  mv -f "$gobin/training-operator.v1" "$TO_CACHE_BIN"
  rm -rf "$gobin"
  date -u +%FT%TZ >"$TO_CACHE_DIR/.complete"
  exec 9>&-
  log "built training-operator $TO_VERSION in $((SECONDS - t0))s"
  link_build
}

link_build() {
  mkdir -p "$BENCH_STATE/bin" "$BENCH_STATE/crds"
  ln -sfn "$TO_CACHE_BIN" "$ANCHOR_BIN"
  ln -sfn "$TO_CACHE_CRD" "$BENCH_STATE/crds/$CRD_FILE"
  log "training-operator $TO_VERSION ready at $ANCHOR_BIN (cache: $TO_CACHE_DIR)"
}

# --- crds --------------------------------------------------------------------
need_cluster() {
  [[ -x ${KUBECTL[0]} ]] || die "no kubectl at ${KUBECTL[0]}; start the local cluster first (make cluster)"
  [[ -f $KUBECONFIG ]] || die "no kubeconfig at $KUBECONFIG; start the local cluster first (make cluster)"
}

cmd_crds() {
  need_cluster
  [[ -f $TO_CACHE_CRD ]] || cmd_build
  log "applying CRD $CRD_NAME ($TO_VERSION)"
  "${KUBECTL[@]}" apply --server-side --force-conflicts --field-manager=keelson-anchor -f "$TO_CACHE_CRD" >&2
  # Polled: `kubectl wait` fails when it reads the CRD before it has any status.
  local deadline=$((SECONDS + 60))
  until crd_established; do
    ((SECONDS < deadline)) || die "CRD $CRD_NAME is not Established after 60s"
    sleep 0.2
  done
  log "CRD $CRD_NAME Established"
}

crd_established() {
  [[ $("${KUBECTL[@]}" get "crd/$CRD_NAME" -o 'jsonpath={.status.conditions[?(@.type=="Established")].status}' 2>/dev/null) == True ]]
}

# --- process helpers ---------------------------------------------------------
# PID of the running anchor from the pid file, if that process is still the operator.
anchor_pid() {
  local pid exe
  [[ -s $PID_FILE ]] || return 1
  pid=$(<"$PID_FILE")
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || return 1
  exe=${exe% (deleted)}
  [[ ${exe##*/} == training-operator ]] || return 1
  alive "$pid" || return 1
  echo "$pid"
}

# WANT free TCP ports (no listener on any address) from ANCHOR_PORT_BASE up, skipping
# the ports given after WANT.
free_ports() {
  local want=$1 p=${ANCHOR_PORT_BASE:-18440} got=() used
  shift
  used=" $(ss -Hltn 2>/dev/null | awk '{n = split($4, a, ":"); printf "%s ", a[n]}') $* "
  while ((${#got[@]} < want && p < 65535)); do
    [[ $used == *" $p "* ]] || got+=("$p")
    p=$((p + 1))
  done
  ((${#got[@]} == want)) || die "found no $want free ports from ${ANCHOR_PORT_BASE:-18440}"
  echo "${got[@]}"
}

port_free() { [[ -z $(ss -Hltn "sport = :$1" 2>/dev/null) ]]; }

# --- start -------------------------------------------------------------------
cmd_start() {
  local logf=${1:-}
  [[ -n $logf ]] || die "usage: anchor.sh start LOGFILE"
  for tool in openssl curl ss setsid; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool is required"
  done
  need_cluster
  local pid
  if pid=$(anchor_pid); then
    die "the anchor already runs (pid $pid, $PID_FILE); run anchor.sh stop first"
  fi
  rm -f "$PID_FILE" "$ENV_FILE"
  cmd_build
  crd_established || cmd_crds

  # Ports: fixed ones from the environment, the rest free ones.
  local free metrics probe webhook p
  read -r -a free <<<"$(free_ports 3 "${ANCHOR_METRICS_PORT:-}" "${ANCHOR_PROBE_PORT:-}" "${ANCHOR_WEBHOOK_PORT:-}")"
  metrics=${ANCHOR_METRICS_PORT:-${free[0]}}
  probe=${ANCHOR_PROBE_PORT:-${free[1]}}
  webhook=${ANCHOR_WEBHOOK_PORT:-${free[2]}}
  for p in "$metrics" "$probe" "$webhook"; do
    port_free "$p" || die "port $p is in use (see: ss -ltnp 'sport = :$p')"
  done

  # The namespace and the (empty) Secret the cert rotator updates.
  "${KUBECTL[@]}" apply --server-side --field-manager=keelson-anchor -f - >/dev/null <<YAML
apiVersion: v1
kind: Namespace
metadata:
  name: $ANCHOR_NAMESPACE
---
apiVersion: v1
kind: Secret
metadata:
  name: $WEBHOOK_SECRET
  namespace: $ANCHOR_NAMESPACE
type: Opaque
YAML

  # A self-signed serving pair for the webhook server, and how the operator is launched.
  local launch=() certs
  if unshare -m --propagation private true 2>/dev/null; then
    certs="$PRIVATE_WEBHOOK_ROOT/serving-certs"
    mkdir -p "$WEBHOOK_ROOT"
    # The operator sees $PRIVATE_WEBHOOK_ROOT at /tmp/k8s-webhook-server; nothing is written there.
    # shellcheck disable=SC2016 # expanded by that sh
    launch=(unshare -m --propagation private -- sh -c 'mount --bind "$1" "$2" && shift 2 && exec "$@"' sh
      "$PRIVATE_WEBHOOK_ROOT" "$WEBHOOK_ROOT")
  else
    certs="$WEBHOOK_ROOT/serving-certs"
    log "no private mount namespace here (unshare -m failed): writing the webhook pair to $certs"
  fi
  mkdir -p "$certs"
  local cn="$WEBHOOK_SERVICE.$ANCHOR_NAMESPACE.svc"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 365 \
    -subj "/CN=$cn" -addext "subjectAltName=DNS:$cn" \
    -keyout "$certs/.tls.key" -out "$certs/.tls.crt" >/dev/null 2>&1 ||
    die "openssl could not make the webhook serving pair in $certs"
  mv -f "$certs/.tls.key" "$certs/tls.key"
  mv -f "$certs/.tls.crt" "$certs/tls.crt"

  local args=(
    --kubeconfig="$KUBECONFIG"
    --enable-scheme=pytorchjob
    --leader-elect=false
    --metrics-bind-address="127.0.0.1:$metrics"
    --health-probe-bind-address="127.0.0.1:$probe"
    --webhook-server-port="$webhook"
    --webhook-service-name="$WEBHOOK_SERVICE"
    --webhook-secret-name="$WEBHOOK_SECRET"
  )
  local extra=()
  [[ -z ${ANCHOR_ARGS:-} ]] || read -r -a extra <<<"$ANCHOR_ARGS"

  mkdir -p "$(dirname "$logf")" "$BENCH_STATE"
  touch "$logf"
  logf=$(cd "$(dirname "$logf")" && pwd)/$(basename "$logf")
  local offset
  offset=$(($(stat -c %s "$logf") + 1))
  printf '\n===== %s starting training-operator %s =====\n' "$(date -u +%FT%TZ)" "$TO_VERSION" >>"$logf"
  offset=$((offset + $(tail -c +"$offset" "$logf" | wc -c)))
  log "starting training-operator $TO_VERSION (log: $logf)"
  # setsid: the process outlives the shell that started it. TMPDIR is unset so that
  # controller-runtime's webhook cert dir is the /tmp path the cert rotator checks.
  env -u TMPDIR MY_POD_NAMESPACE="$ANCHOR_NAMESPACE" \
    setsid "${launch[@]}" "$ANCHOR_BIN" "${args[@]}" "${extra[@]}" >>"$logf" 2>&1 </dev/null 9>&- &
  pid=$!
  echo "$pid" >"$PID_FILE"
  cat >"$ENV_FILE" <<ENV
ANCHOR_PID=$pid
ANCHOR_VERSION=$TO_VERSION
ANCHOR_LOG=$logf
ANCHOR_METRICS_URL=http://127.0.0.1:$metrics/metrics
ANCHOR_PROBE_URL=http://127.0.0.1:$probe
ANCHOR_WEBHOOK_PORT=$webhook
ANCHOR_NAMESPACE=$ANCHOR_NAMESPACE
ENV

  # Ready: /readyz answers ok (certificates ready, webhook server up) and the
  # PyTorchJob controller has synced its caches and started its workers.
  local timeout=${ANCHOR_START_TIMEOUT:-60} deadline t0=$SECONDS
  deadline=$((SECONDS + timeout))
  until [[ $(curl -fsS --max-time 2 "http://127.0.0.1:$probe/readyz" 2>/dev/null) == ok ]] &&
    tail -c +"$offset" "$logf" | grep -F 'Starting workers' | grep -qF 'pytorchjob-controller'; do
    if ! alive "$pid"; then
      wait "$pid" 2>/dev/null || true
      start_failed "$logf" "$offset" "exited during startup"
    fi
    if ((SECONDS >= deadline)); then
      start_failed "$logf" "$offset" "is running (pid $pid) but did not start the PyTorchJob controller within ${timeout}s; stop it with anchor.sh stop"
    fi
    sleep 0.2
  done
  log "training-operator $TO_VERSION reconciling PyTorchJobs (pid $pid, ready in $((SECONDS - t0))s, metrics http://127.0.0.1:$metrics/metrics)"
}

start_failed() {
  {
    echo "[anchor] ERROR: training-operator $3"
    echo "[anchor] last lines of $1:"
    tail -c +"$2" "$1" | tail -n 30 | sed 's/^/    /'
  } >&2
  anchor_pid >/dev/null || rm -f "$PID_FILE"
  exit 1
}

# --- stop --------------------------------------------------------------------
cmd_stop() {
  local pid timeout=${ANCHOR_STOP_TIMEOUT:-10} deadline
  if ! pid=$(anchor_pid); then
    rm -f "$PID_FILE" "$ENV_FILE"
    log "the anchor is not running"
    return 0
  fi
  log "stopping training-operator (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  deadline=$((SECONDS + timeout))
  while alive "$pid" && ((SECONDS < deadline)); do sleep 0.1; done
  if alive "$pid"; then
    log "training-operator (pid $pid) still running after ${timeout}s; sending KILL"
    kill -KILL "$pid" 2>/dev/null || true
    for _ in $(seq 50); do alive "$pid" || break; sleep 0.1; done
  fi
  rm -f "$PID_FILE" "$ENV_FILE"
}

# --- status ------------------------------------------------------------------
cmd_status() {
  local pid
  pid=$(anchor_pid) || { echo "not running"; exit 1; }
  cat "$ENV_FILE" 2>/dev/null || true
  echo "ANCHOR_RSS_KIB=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status")"
}

# --- manifest ----------------------------------------------------------------
cmd_manifest() {
  local name=${1:-}
  [[ $name =~ ^[a-z0-9]([-a-z0-9]*[a-z0-9])?$ ]] || die "usage: anchor.sh manifest NAME (a DNS label)"
  sed "0,/^  name: .*/s//  name: $name/" "$REPO_ROOT/hack/bench/pytorchjob-4.yaml"
}

# --- clean -------------------------------------------------------------------
cmd_clean() {
  need_cluster
  cmd_stop
  log "deleting namespace $ANCHOR_NAMESPACE and CRD $CRD_NAME"
  "${KUBECTL[@]}" delete namespace "$ANCHOR_NAMESPACE" --ignore-not-found --wait=true --timeout=120s >&2
  "${KUBECTL[@]}" delete crd "$CRD_NAME" --ignore-not-found --wait=true --timeout=120s >&2
}

case ${1:-} in
  build) cmd_build ;;
  crds) cmd_crds ;;
  start) shift; cmd_start "$@" ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  manifest) shift; cmd_manifest "$@" ;;
  clean) cmd_clean ;;
  *) usage ;;
esac
