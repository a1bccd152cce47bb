#!/usr/bin/env bash
# Check that the running local cluster behaves as docs/cluster.md says:
# nodes Ready, Deployment -> ReplicaSet -> Ready pods -> Service endpoints,
# GPU pods land only on GPU nodes, the simulated exit codes, garbage
# collection, PVC binding, pod deletion. Works in namespace keelson-smoke and
# removes it (and its PV) afterwards. Ends with 'N passed, N failed'.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
trap - ERR
set +o errtrace

[[ -f $KUBECONFIG_FILE ]] || die "no cluster (no $KUBECONFIG_FILE); run make cluster first"
NS=keelson-smoke
PV=keelson-smoke-pv
k() { "$BIN_DIR/kubectl" --kubeconfig "$KUBECONFIG_FILE" --request-timeout=20s "$@"; }
passed=0 failed=0
check() { # check "description" command...
  local what=$1
  shift
  if out=$("$@" 2>&1); then
    echo "ok - $what"
    passed=$((passed + 1))
  else
    echo "FAIL - $what"
    sed 's/^/    /' <<<"$out" | tail -n 15
    failed=$((failed + 1))
  fi
}
cleanup() {
  k delete namespace "$NS" --ignore-not-found --wait=true --timeout=60s >/dev/null 2>&1
  k delete pv "$PV" --ignore-not-found >/dev/null 2>&1
}
# poll CMD until its output equals WANT (bounded)
until_eq() {
  local want=$1 got="" i
  shift
  for ((i = 0; i < 60; i++)); do
    got=$("$@" 2>&1) && [[ $got == "$want" ]] && return 0
    sleep 0.5
  done
  echo "wanted '$want', got '$got' from: $*"
  return 1
}

cleanup
k create namespace "$NS" >/dev/null || die "cannot create namespace $NS"
until_eq default k -n "$NS" get sa default -o 'jsonpath={.metadata.name}' >/dev/null
trap cleanup EXIT

want_nodes=$((KWOK_CPU_NODES + KWOK_GPU_NODES))
check "$want_nodes simulated nodes Ready" until_eq "$want_nodes" bash -c \
  "'$BIN_DIR/kubectl' --kubeconfig '$KUBECONFIG_FILE' get nodes -l type=kwok -o jsonpath='{range .items[*]}{.status.conditions[?(@.type==\"Ready\")].status}{\"\\n\"}{end}' | grep -c '^True$'"

# Deployment -> ReplicaSet -> Pods Ready -> Service endpoints.
k -n "$NS" create deployment web --image=registry.invalid/web --replicas=2 --port=80 >/dev/null
k -n "$NS" expose deployment web --port=80 >/dev/null
check "Deployment rolls out (pods Running and Ready)" k -n "$NS" rollout status deployment/web --timeout=60s
check "Service gets 2 endpoints" until_eq 2 bash -c \
  "'$BIN_DIR/kubectl' --kubeconfig '$KUBECONFIG_FILE' -n $NS get endpointslices -l kubernetes.io/service-name=web -o jsonpath='{range .items[*].endpoints[*]}{.addresses[0]}{\"\\n\"}{end}' | grep -c ."

# GPU pod: toleration + limits -> a GPU node only.
k -n "$NS" apply -f - >/dev/null <<YAML
apiVersion: v1
kind: Pod
metadata: {name: gpu}
spec:
  restartPolicy: Never
  tolerations: [{key: "$KWOK_GPU_RESOURCE", operator: Exists, effect: NoSchedule}]
  containers:
  - {name: main, image: registry.invalid/train, resources: {limits: {"$KWOK_GPU_RESOURCE": "2"}}}
YAML
check "GPU pod becomes Ready" k -n "$NS" wait --for=condition=Ready pod/gpu --timeout=60s
check "GPU pod runs on a GPU node" bash -c "[[ \$('$BIN_DIR/kubectl' --kubeconfig '$KUBECONFIG_FILE' -n $NS get pod gpu -o jsonpath='{.spec.nodeName}') == kwok-gpu-* ]]"

# Simulated exits.
for code in 0 137; do
  k -n "$NS" run "exit-$code" --image=registry.invalid/x --restart=Never >/dev/null
done
check "pods to exit become Ready" k -n "$NS" wait --for=condition=Ready pod/exit-0 pod/exit-137 --timeout=60s
k -n "$NS" annotate pod exit-0 keelson.dev/sim-exit-code=0 >/dev/null
k -n "$NS" annotate pod exit-137 keelson.dev/sim-exit-code=137 >/dev/null
fmt='jsonpath={.status.phase}/{.status.containerStatuses[0].state.terminated.exitCode}/{.status.containerStatuses[0].state.terminated.reason}'
check "sim-exit-code=0 -> Succeeded, exit 0, Completed" until_eq "Succeeded/0/Completed" k -n "$NS" get pod exit-0 -o "$fmt"
check "sim-exit-code=137 -> Failed, exit 137, Error" until_eq "Failed/137/Error" k -n "$NS" get pod exit-137 -o "$fmt"

# Garbage collection of a child whose owner is deleted.
k -n "$NS" create configmap owner >/dev/null
uid=$(k -n "$NS" get configmap owner -o jsonpath='{.metadata.uid}')
k -n "$NS" apply -f - >/dev/null <<YAML
apiVersion: v1
kind: ConfigMap
metadata:
  name: child
  ownerReferences: [{apiVersion: v1, kind: ConfigMap, name: owner, uid: "$uid", controller: true}]
YAML
k -n "$NS" delete configmap owner >/dev/null
check "garbage collector deletes the owned child" k -n "$NS" wait --for=delete configmap/child --timeout=60s

# PVC: Pending (and its pod unschedulable) until a PV exists, then Bound.
k -n "$NS" apply -f - >/dev/null <<YAML
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: data}
spec:
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 1Gi}}
---
apiVersion: v1
kind: Pod
metadata: {name: with-pvc}
spec:
  containers: [{name: main, image: registry.invalid/x}]
  volumes: [{name: data, persistentVolumeClaim: {claimName: data}}]
YAML
sleep 3
check "pod with an unbound PVC stays Pending, unscheduled" until_eq "Pending/False" \
  k -n "$NS" get pod with-pvc -o 'jsonpath={.status.phase}/{.status.conditions[?(@.type=="PodScheduled")].status}'
"$CLUSTER_DIR/pv.sh" "$PV" 2Gi >/dev/null
check "PVC binds to the new PV" k -n "$NS" wait --for=jsonpath='{.status.phase}'=Bound pvc/data --timeout=60s
check "its pod then becomes Ready" k -n "$NS" wait --for=condition=Ready pod/with-pvc --timeout=60s

# Deleting a pod on a kwok node completes.
check "pod deletion completes" k -n "$NS" delete pod gpu --timeout=30s

echo "$passed passed, $failed failed"
((failed == 0))
