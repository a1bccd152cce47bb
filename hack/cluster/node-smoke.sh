#!/usr/bin/env bash
# Check the real node with real containers and traffic (make cluster-smoke-real):
#   - the node is Ready, tainted and labelled; kwok leaves it alone
#   - a pod (imagePullPolicy: Never, stand-in image) runs on it
#   - two trainer pods behind a headless Service find rank 0 by DNS
#     (<pod>.<svc>.<ns>.svc), exchange their data checksum over TCP, exit 0
#   - a pod reaches the API server at https://kubernetes.default.svc (CA verified)
#   - a ClusterIP Service routes to the model server, by name from a pod and by
#     address from the host
#   - the notebook stand-in refuses a request without its token
# Works in namespace keelson-node-smoke and removes it. Ends with 'N passed, N failed'.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
trap - ERR
set +o errtrace

[[ -f $KUBECONFIG_FILE ]] || die "no cluster (no $KUBECONFIG_FILE); run REAL_NODE=1 make cluster first"
component_pid kubelet >/dev/null || die "no real node runs; run REAL_NODE=1 make cluster first"
NS=keelson-node-smoke
k() { "$BIN_DIR/kubectl" --kubeconfig "$KUBECONFIG_FILE" --request-timeout=20s "$@"; }
passed=0 failed=0
check() { # check "description" command...
  local what=$1 t0=$SECONDS
  shift
  if out=$("$@" 2>&1); then
    echo "ok - $what ($((SECONDS - t0))s)"
    passed=$((passed + 1))
  else
    echo "FAIL - $what"
    sed 's/^/    /' <<<"$out" | tail -n 25
    failed=$((failed + 1))
  fi
}
cleanup() { k delete namespace "$NS" --ignore-not-found --wait=true --timeout=90s >/dev/null 2>&1; }
# Poll until a pod reaches a phase; print its logs and events when it does not.
wait_phase() { # pod phase timeout
  local pod=$1 want=$2 timeout=${3:-90} got="" deadline
  deadline=$((SECONDS + timeout))
  while ((SECONDS < deadline)); do
    got=$(k -n "$NS" get pod "$pod" -o 'jsonpath={.status.phase}' 2>/dev/null)
    [[ $got == "$want" ]] && return 0
    [[ $got == Failed && $want != Failed ]] && break
    sleep 1
  done
  echo "pod $pod: phase '$got', wanted '$want'"
  k -n "$NS" logs "$pod" --all-containers --tail=20 2>&1 | sed 's/^/  log: /'
  k -n "$NS" get events --field-selector "involvedObject.name=$pod" \
    -o 'custom-columns=REASON:.reason,MESSAGE:.message' 2>&1 | tail -n 8
  return 1
}
logs_have() { # pod regex
  k -n "$NS" logs "$1" 2>&1 | grep -E "$2" || { k -n "$NS" logs "$1" 2>&1 | tail -n 20; return 1; }
}

cleanup
k create namespace "$NS" >/dev/null || die "cannot create namespace $NS"
for _ in $(seq 60); do k -n "$NS" get sa default >/dev/null 2>&1 && break; sleep 0.5; done
trap cleanup EXIT

# Everything below lands on the real node only.
PLACE="  nodeSelector: {keelson.dev/real-node: \"true\"}
  tolerations: [{key: keelson.dev/real-node, operator: Exists, effect: NoSchedule}]"

check "node $REAL_NODE_NAME is Ready, tainted and labelled" bash -c "
  k() { '$BIN_DIR/kubectl' --kubeconfig '$KUBECONFIG_FILE' \"\$@\"; }
  [[ \$(k get node $REAL_NODE_NAME -o jsonpath='{.status.conditions[?(@.type==\"Ready\")].status}') == True ]] &&
  k get node $REAL_NODE_NAME -o jsonpath='{.spec.taints}' | grep -q 'keelson.dev/real-node' &&
  [[ \$(k get node $REAL_NODE_NAME -o jsonpath='{.metadata.labels.keelson\\.dev/real-node}') == true ]] &&
  [[ -z \$(k get node $REAL_NODE_NAME -o jsonpath='{.metadata.annotations.kwok\\.x-k8s\\.io/node}') ]]"

# A pod with no toleration never lands on the real node.
k -n "$NS" apply -f - >/dev/null <<YAML
apiVersion: v1
kind: Pod
metadata: {name: untolerated}
spec:
  nodeSelector: {keelson.dev/real-node: "true"}
  containers: [{name: c, image: keelson.dev/trainer:dev, imagePullPolicy: Never}]
YAML

# --- one pod -------------------------------------------------------------------
k -n "$NS" apply -f - >/dev/null <<YAML
apiVersion: v1
kind: Pod
metadata: {name: single}
spec:
$PLACE
  restartPolicy: Never
  containers:
  - name: trainer
    image: keelson.dev/trainer:dev
    imagePullPolicy: Never
    env: [{name: WORLD_SIZE, value: "1"}, {name: EXIT_CODE, value: "0"}]
YAML
check "a pod runs on the real node (imagePullPolicy: Never) and succeeds" wait_phase single Succeeded 120

# --- two trainers behind a headless Service -------------------------------------
k -n "$NS" apply -f - >/dev/null <<YAML
apiVersion: v1
kind: ConfigMap
metadata: {name: shard}
data: {shard.txt: "the same data on every rank\n"}
---
apiVersion: v1
kind: Service
metadata: {name: tj}
spec:
  clusterIP: None
  publishNotReadyAddresses: true
  selector: {job: tj}
  ports: [{name: rdzv, port: 29500}]
YAML
for rank in 0 1; do
  k -n "$NS" apply -f - >/dev/null <<YAML
apiVersion: v1
kind: Pod
metadata: {name: tj-worker-$rank, labels: {job: tj}}
spec:
$PLACE
  restartPolicy: Never
  hostname: tj-worker-$rank
  subdomain: tj
  containers:
  - name: trainer
    image: keelson.dev/trainer:dev
    imagePullPolicy: Never
    env:
    - {name: RANK, value: "$rank"}
    - {name: WORLD_SIZE, value: "2"}
    - {name: MASTER_ADDR, value: "tj-worker-0.tj.$NS.svc"}
    - {name: MASTER_PORT, value: "29500"}
    - {name: DATA_FILE, value: /data/shard.txt}
    - {name: TIMEOUT, value: 90s}
    ports: [{containerPort: 29500}]
    volumeMounts: [{name: data, mountPath: /data, readOnly: true}]
  volumes: [{name: data, configMap: {name: shard}}]
YAML
done
check "trainer rank 1 finds rank 0 by DNS, exchanges checksums, exits 0" wait_phase tj-worker-1 Succeeded 120
check "trainer rank 0 accepts rank 1 and exits 0" wait_phase tj-worker-0 Succeeded 60
check "rank 0's log shows the DNS answer and the shared checksum" logs_have tj-worker-0 'all 1 peers joined with the same data'

# --- model server behind a ClusterIP Service -------------------------------------
k -n "$NS" apply -f - >/dev/null <<YAML
apiVersion: apps/v1
kind: Deployment
metadata: {name: ms}
spec:
  replicas: 1
  selector: {matchLabels: {app: ms}}
  template:
    metadata: {labels: {app: ms}}
    spec:
$(sed 's/^/    /' <<<"$PLACE")
      containers:
      - name: server
        image: keelson.dev/modelserver:dev
        imagePullPolicy: Never
        env: [{name: VARIANT, value: smoke-champion}, {name: MODEL_PATH, value: /models}]
        readinessProbe: {httpGet: {path: /v2/health/ready, port: 8080}, periodSeconds: 1}
        volumeMounts: [{name: model, mountPath: /models, readOnly: true}]
      volumes: [{name: model, configMap: {name: shard}}]
---
apiVersion: v1
kind: Service
metadata: {name: ms}
spec:
  selector: {app: ms}
  ports: [{port: 80, targetPort: 8080}]
YAML
check "model server Deployment is available" k -n "$NS" wait deploy/ms --for=condition=Available --timeout=90s
# A ready pod reaches the Service only once kube-proxy has written its rules (until then the
# ClusterIP rejects: "connection refused"); on a loaded host that takes seconds, so poll for it.
ms_ip=$(k -n "$NS" get svc ms -o 'jsonpath={.spec.clusterIP}')
check "the host reaches the model server at its ClusterIP $ms_ip (kube-proxy iptables)" bash -c "
  for _ in \$(seq 60); do
    curl -fsS --max-time 5 http://$ms_ip/ 2>&1 | grep '\"variant\":\"smoke-champion\"' && exit 0
    sleep 1
  done
  curl -sS --max-time 5 http://$ms_ip/ 2>&1; exit 1"
k -n "$NS" apply -f - >/dev/null <<YAML
apiVersion: v1
kind: Pod
metadata: {name: client}
spec:
$PLACE
  restartPolicy: Never
  containers:
  - name: fetch
    image: keelson.dev/modelserver:dev
    imagePullPolicy: Never
    args: [fetch, "https://kubernetes.default.svc/version", "http://ms.$NS.svc.cluster.local/predict"]
YAML
check "a pod reaches the API server at https://kubernetes.default.svc and the model server by Service name" \
  wait_phase client Succeeded 90
check "the API server answered the pod with its version" logs_have client '"gitVersion": "'"$KUBE_VERSION"'"'
check "the model server answered through its Service with its variant and model files" \
  logs_have client '"variant":"smoke-champion".*"name":"shard.txt"'

# --- notebook stand-in: token ------------------------------------------------------
k -n "$NS" apply -f - >/dev/null <<YAML
apiVersion: v1
kind: Pod
metadata: {name: nb, labels: {app: nb}}
spec:
$PLACE
  containers:
  - name: notebook
    image: keelson.dev/notebook:dev
    imagePullPolicy: Never
    env: [{name: JUPYTER_TOKEN, value: smoke-token}]
    readinessProbe: {tcpSocket: {port: 8888}, periodSeconds: 1}
YAML
check "notebook stand-in runs" k -n "$NS" wait pod/nb --for=condition=Ready --timeout=90s
nb_ip=$(k -n "$NS" get pod nb -o 'jsonpath={.status.podIP}')
check "notebook refuses /api/status without the token (403) and answers with it" bash -c "
  [[ \$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 http://$nb_ip:8888/api/status) == 403 ]] &&
  curl -fsS --max-time 5 -H 'Authorization: token smoke-token' http://$nb_ip:8888/api/status | grep -q '\"kernels\":0'"
check "notebook writes a file into its workspace and reads it back" bash -c "
  curl -fsS --max-time 5 -X PUT -d '{\"type\":\"file\",\"format\":\"text\",\"content\":\"hello\"}' \
    'http://$nb_ip:8888/api/contents/smoke.txt?token=smoke-token' >/dev/null &&
  curl -fsS --max-time 5 'http://$nb_ip:8888/api/contents/smoke.txt?token=smoke-token' | grep -q '\"content\":\"hello\"'"

check "the untolerated pod stays Pending (the taint keeps it off the real node)" bash -c "
  [[ \$('$BIN_DIR/kubectl' --kubeconfig '$KUBECONFIG_FILE' -n $NS get pod untolerated -o jsonpath='{.status.phase}') == Pending ]]"

echo "node-smoke: $passed passed, $failed failed"
((failed == 0))
