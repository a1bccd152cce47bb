#!/usr/bin/env bash
# make demo / make demo-down: the operator on the embedded local cluster with every example applied.
#
#   hack/demo.sh up     cluster up, CRDs installed, `keelson run` as a local process, examples applied
#   hack/demo.sh down   stops the operator and the cluster (make demo-down)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
STATE=$ROOT/target/demo
NS=${DEMO_NAMESPACE:-keelson-demo}
KUBECONFIG_FILE=$ROOT/target/cluster/kubeconfig
K=("$ROOT/target/cluster/bin/kubectl" --kubeconfig "$KUBECONFIG_FILE")
say() { printf '\033[1m[demo]\033[0m %s\n' "$*"; }

stop_operator() {
  if [[ -f $STATE/keelson.pid ]]; then
    local pid; pid=$(cat "$STATE/keelson.pid")
    if kill -0 "$pid" 2>/dev/null && grep -q keelson "/proc/$pid/cmdline" 2>/dev/null; then
      say "stopping the operator (pid $pid)"
      kill -TERM "$pid"
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
      kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$STATE/keelson.pid"
  fi
}

case ${1:-up} in
  down)
    stop_operator
    hack/cluster/down.sh
    say "demo stopped"
    exit 0
    ;;
  up) ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac

mkdir -p "$STATE"
say "starting the local cluster (the first run builds it from Go modules: several minutes)"
hack/cluster/up.sh
say "building keelson"
cargo build --bin keelson
say "installing the CRDs"
"${K[@]}" apply --server-side --force-conflicts -f crds/ >/dev/null
# A new CRD has no conditions for a moment, which `kubectl wait` treats as an error: poll instead.
for crd in notebooks trainingjobs modeldeployments; do
  for _ in $(seq 1 120); do
    [[ $("${K[@]}" get crd "$crd.keelson.dev" -o jsonpath="{.status.conditions[?(@.type=='Established')].status}") == True ]] && break
    sleep 0.5
  done
done

stop_operator
say "starting the operator: target/debug/keelson run (log: $STATE/keelson.log)"
KUBECONFIG=$KUBECONFIG_FILE setsid target/debug/keelson run --health-addr 127.0.0.1:18080 >>"$STATE/keelson.log" 2>&1 < /dev/null &
echo $! >"$STATE/keelson.pid"
sleep 1
kill -0 "$(cat "$STATE/keelson.pid")" 2>/dev/null || { tail -20 "$STATE/keelson.log"; echo "the operator exited" >&2; exit 1; }

"${K[@]}" create namespace "$NS" --dry-run=client -o yaml | "${K[@]}" apply -f - >/dev/null
# The cluster has no storage provisioner: one PersistentVolume for each claim the examples make.
for claim in shared-datasets:100Gi models:10Gi alice-workspace:10Gi scratch-workspace:5Gi; do
  pv="$NS-${claim%%:*}"
  # A volume left Released by an earlier demo cannot bind again: make it anew.
  if [[ $("${K[@]}" get pv "$pv" -o jsonpath='{.status.phase}' 2>/dev/null) == Released ]]; then
    "${K[@]}" delete pv "$pv" --wait=true >/dev/null
  fi
  hack/cluster/pv.sh "$NS-${claim%%:*}" "${claim#*:}" --claim "$NS/${claim%%:*}" >/dev/null
done
say "applying examples/ to namespace $NS"
"${K[@]}" -n "$NS" apply --server-side -f examples/

say "waiting for Ready"
"${K[@]}" -n "$NS" wait --for=condition=Ready --timeout=120s notebooks --all
"${K[@]}" -n "$NS" wait --for=condition=Ready --timeout=120s modeldeployments --all
while read -r tj suspend; do
  if [[ $suspend == true ]]; then
    "${K[@]}" -n "$NS" wait --for=jsonpath='{.status.phase}'=Suspended --timeout=120s "trainingjob/$tj"
  else
    "${K[@]}" -n "$NS" wait --for=condition=Ready --timeout=120s "trainingjob/$tj"
  fi
done < <("${K[@]}" -n "$NS" get trainingjobs -o jsonpath='{range .items[*]}{.metadata.name}{" "}{.spec.suspend}{"\n"}{end}')

echo
"${K[@]}" get keelson -A
cat <<MSG

The operator runs as a local process (pid $(cat "$STATE/keelson.pid"), log $STATE/keelson.log).
Use the cluster:
  export KUBECONFIG=$KUBECONFIG_FILE      # or: source hack/cluster/env.sh (kubectl on PATH too)
  kubectl -n $NS get tj,nb,mdep
  kubectl -n $NS get secret alice-token -o jsonpath='{.data.token}' | base64 -d
  kubectl -n $NS patch tj bert-queued --type=merge -p '{"spec":{"suspend":false}}'
Stop everything with: make demo-down
MSG
