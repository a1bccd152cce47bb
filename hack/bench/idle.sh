#!/usr/bin/env bash
# Idle memory of `keelson run`: the operator started against the local cluster with no Keelson
# objects, leader elected and Ready, then left alone. Prints its resident memory split into the
# anonymous part (heap, stacks) and the file-backed part (the binary's code and read-only data, and
# the shared libraries), read from /proc/<pid>/status after SETTLE seconds, one row per binary.
# Asserts nothing.
#
#   hack/bench/idle.sh [BINARY...]     default: target/release/keelson (built unless SKIP_BUILD=1)
#
# Knobs (environment): SETTLE (s after Ready, 20), SAMPLES (reads 1 s apart, median taken, 5),
# KUBECONFIG_FILE (default target/cluster/kubeconfig; `make bench-idle` starts the cluster).
set -euo pipefail
cd "$(dirname "$0")/../.."

SETTLE=${SETTLE:-20}
SAMPLES=${SAMPLES:-5}
KUBECONFIG_FILE=${KUBECONFIG_FILE:-$PWD/target/cluster/kubeconfig}
[[ -f $KUBECONFIG_FILE ]] || { echo "no cluster: $KUBECONFIG_FILE (run make cluster)" >&2; exit 1; }

bins=("$@")
if ((${#bins[@]} == 0)); then
  [[ ${SKIP_BUILD:-0} == 1 ]] || cargo build --release --bin keelson >&2
  bins=("$PWD/target/release/keelson")
fi

pids=()
cleanup() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
field() { awk -v k="$1:" '$1 == k {print $2}' "/proc/$2/status"; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
mib() { awk -v k="$1" 'BEGIN {printf "%.1f", k / 1024}'; }

echo
echo "Idle \`keelson run\` on the local cluster (no Keelson objects), ${SETTLE}s after Ready;"
echo "median of $SAMPLES reads of /proc/<pid>/status. RSS = anonymous + file-backed (code, read-only"
echo "data, shared libraries); the binary's size on disk is unstripped."
echo
echo "| binary | size MiB | RSS MiB | anonymous MiB | file-backed MiB | peak RSS MiB | threads |"
echo "|--------|---------:|--------:|--------------:|----------------:|-------------:|--------:|"
for bin in "${bins[@]}"; do
  [[ -x $bin ]] || { echo "not executable: $bin" >&2; exit 1; }
  port=$(free_port)
  lease="keelson-idle-$$-$port"
  log=$(mktemp -t keelson-idle.XXXXXX)
  KUBECONFIG=$KUBECONFIG_FILE "$bin" run --health-addr "127.0.0.1:$port" --lease-name "$lease" \
    --lease-namespace default >"$log" 2>&1 &
  pid=$!
  pids+=("$pid")
  ready=0
  for _ in $(seq 1 300); do
    if curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null 2>&1; then ready=1; break; fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.2
  done
  ((ready)) || { echo "$bin did not become Ready; its log:" >&2; tail -20 "$log" >&2; exit 1; }
  sleep "$SETTLE"
  rss=() anon=() file=()
  for _ in $(seq 1 "$SAMPLES"); do
    rss+=("$(field VmRSS "$pid")")
    anon+=("$(field RssAnon "$pid")")
    file+=("$(($(field RssFile "$pid") + $(field RssShmem "$pid")))")
    sleep 1
  done
  hwm=$(field VmHWM "$pid")
  threads=$(field Threads "$pid")
  size=$(stat -c %s "$bin")
  printf '| %s | %.1f | %s | %s | %s | %s | %s |\n' "$bin" "$(awk -v b="$size" 'BEGIN {print b / 1048576}')" \
    "$(mib "$(printf '%s\n' "${rss[@]}" | median)")" "$(mib "$(printf '%s\n' "${anon[@]}" | median)")" \
    "$(mib "$(printf '%s\n' "${file[@]}" | median)")" "$(mib "$hwm")" "$threads"
  kill -TERM "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  rm -f "$log"
done
