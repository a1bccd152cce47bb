#!/usr/bin/env bash
# make demo / make demo-down: the operator on the embedded local cluster with every example applied.
#
#   hack/demo.sh up     cluster up, CRDs installed, `keelson run` as a local process, examples applied
#   hack/demo.sh down   stops the operator and the cluster (make demo-down)
#
# REAL_NODE=1 adds the real node (docs/real-node.md): the images are built (the first `make image` is a
# release build), the fraud model's variants and its router run there as the stand-in model server, and
# the demo ends with 20 requests through the Service `fraud`, each printing the variant that answered.
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
if [[ ${REAL_NODE:-0} == 1 ]]; then
  say "building the images for the real node (the first time: a release build of keelson)"
  hack/images/build.sh pause workloads keelson
fi
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
KUBECONFIG=$KUBECONFIG_FILE KEELSON_ROUTER_IMAGE=keelson.dev/keelson:dev setsid target/debug/keelson run --health-addr 127.0.0.1:18080 >>"$STATE/keelson.log" 2>&1 < /dev/null &
echo $! >"$STATE/keelson.pid"
sleep 1
kill -0 "$(cat "$STATE/keelson.pid")" 2>/dev/null || { tail -20 "$STATE/keelson.log"; echo "the operator exited" >&2; exit 1; }

"${K[@]}" create namespace "$NS" --dry-run=client -o yaml | "${K[@]}" apply -f - >/dev/null
# The cluster has no storage provisioner: one PersistentVolume for each claim the examples make.
for claim in shared-datasets:100Gi models:10Gi scorer-models:5Gi alice-workspace:10Gi scratch-workspace:5Gi; do
  pv="$NS-${claim%%:*}"
  # A volume left Released by an earlier demo cannot bind again: make it anew.
  if [[ $("${K[@]}" get pv "$pv" -o jsonpath='{.status.phase}' 2>/dev/null) == Released ]]; then
    "${K[@]}" delete pv "$pv" --wait=true >/dev/null
  fi
  hack/cluster/pv.sh "$NS-${claim%%:*}" "${claim#*:}" --claim "$NS/${claim%%:*}" >/dev/null
done
say "applying examples/ to namespace $NS"
"${K[@]}" -n "$NS" apply --server-side --force-conflicts -f examples/
if [[ ${REAL_NODE:-0} == 1 ]]; then
  # Two model versions in the `models` volume, read in place by the variants (MODEL_PATH).
  for v in v7 v8; do
    mkdir -p "target/cluster/volumes/$NS-models/fraud/$v"
    echo "fraud model $v" >"target/cluster/volumes/$NS-models/fraud/$v/model.bin"
  done
  say "running the fraud model on the real node: the stand-in model server, its router there too"
  # One variant of the stand-in model server on the real node: name, weight, model version, replicas.
  variant() {
    cat <<YAML
    - name: $1
      image: keelson.dev/modelserver:dev
      replicas: $4
      weight: $2
      model: {uri: "pvc://models/fraud/$3"}
      env: [{name: VARIANT, value: $1}]
      resources:
        requests: {cpu: 50m, memory: 32Mi}
      nodeSelector: {keelson.dev/real-node: "true"}
      tolerations: [{key: keelson.dev/real-node, operator: Exists, effect: NoSchedule}]
YAML
  }
  {
    cat <<'YAML'
apiVersion: keelson.dev/v1alpha1
kind: ModelDeployment
metadata:
  name: fraud
spec:
  port: 8080
  variants:
YAML
    variant champion 90 v7 2
    variant challenger 10 v8 1
    cat <<'YAML'
  traffic:
    router: Builtin
    stickyHeader: x-user-id
    routerPod:
      nodeSelector: {keelson.dev/real-node: "true"}
      tolerations: [{key: keelson.dev/real-node, operator: Exists, effect: NoSchedule}]
YAML
  } | "${K[@]}" -n "$NS" apply --server-side --force-conflicts --field-manager=keelson-demo -f -
fi

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
if [[ ${REAL_NODE:-0} == 1 ]]; then
  "${K[@]}" -n "$NS" rollout status deploy/fraud-router --timeout=120s >/dev/null
  addr=$("${K[@]}" -n "$NS" get svc fraud -o jsonpath='{.spec.clusterIP}:{.spec.ports[0].port}')
  echo
  say "20 requests to the Service fraud ($addr, through kube-proxy and the router pod):"
  for i in $(seq 1 20); do
    variant=$({ curl -sS --max-time 5 -o /dev/null -D - "http://$addr/predict" 2>/dev/null || true; } |
      tr -d '\r' | awk -F': ' 'tolower($1) == "x-variant" {print $2; exit}')
    printf '  request %2d -> %s\n' "$i" "${variant:-(no answer)}"
  done
fi
cat <<MSG

The operator runs as a local process (pid $(cat "$STATE/keelson.pid"), log $STATE/keelson.log).
Use the cluster:
  export KUBECONFIG=$KUBECONFIG_FILE      # or: source hack/cluster/env.sh (kubectl on PATH too)
  kubectl -n $NS get tj,nb,mdep
  kubectl -n $NS get secret alice-token -o jsonpath='{.data.token}' | base64 -d
  kubectl -n $NS patch tj bert-queued --type=merge -p '{"spec":{"suspend":false}}'
Stop everything with: make demo-down
MSG
