#!/usr/bin/env bash
# Start the local control plane (make cluster). Idempotent: components that
# already run are left alone, missing ones are started, and a cluster that
# is fully up is reported as such.
#
#   etcd -> kube-apiserver -> kube-controller-manager, kube-scheduler -> kwok
#   + simulated nodes kwok-cpu-<i> (KWOK_CPU_NODES) and kwok-gpu-<i> (KWOK_GPU_NODES)
#   -> kueue (its CRDs, webhooks and configuration: kueue.sh)
#
# State lives in target/cluster/: certs/, etcd/, pids/, logs/<component>.log,
# kubeconfig (cluster-admin). Everything listens on 127.0.0.1 only.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
source "$CLUSTER_DIR/kueue.sh"

T0=$SECONDS
START_TIMEOUT=${CLUSTER_START_TIMEOUT:-120}

for tool in openssl curl ss flock setsid; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool is required (Debian package: $(
    case $tool in ss) echo iproute2 ;; flock | setsid) echo util-linux ;; *) echo "$tool" ;; esac))"
done

# A real node that was brought up (and not taken down by down.sh) stays, even
# when REAL_NODE is not set: it keeps its apiserver flags, is restarted if its
# processes died, and gets the node binaries a newer checkout adds.
if [[ $REAL_NODE != 1 ]] && { component_pid kubelet >/dev/null || [[ -d $NODE_STATE ]]; }; then
  log "this cluster has a real node (hack/cluster/down.sh removes it); keeping it"
  REAL_NODE=1
fi
export REAL_NODE
"$CLUSTER_DIR/build.sh"
lock_state
mkdir -p "$PIDS_DIR" "$LOGS_DIR"

KUBECTL=("$BIN_DIR/kubectl" --kubeconfig "$KUBECONFIG_FILE" --request-timeout=10s)
CURL_ADMIN=(curl -fsS --max-time 3 --cacert "$CERTS_DIR/ca.crt" --cert "$CERTS_DIR/admin.crt" --key "$CERTS_DIR/admin.key")

# --- failure reporting -------------------------------------------------------
fail_component() {
  local name=$1 msg=$2 logf="$LOGS_DIR/$1.log"
  {
    echo
    echo "[cluster] ERROR: $name $msg"
    echo "[cluster] log: $logf"
    if [[ -f $logf ]]; then
      echo "[cluster] last lines of $logf:"
      tail -n 40 "$logf" | sed 's/^/    /'
    fi
    echo "[cluster] fix the cause, then run hack/cluster/up.sh again (or hack/cluster/down.sh to start clean)"
  } >&2
  exit 1
}

# --- health checks -----------------------------------------------------------
healthy() {
  case $1 in
    etcd) curl -fsS --max-time 3 "http://$CLUSTER_HOST:$ETCD_CLIENT_PORT/health" 2>/dev/null | grep -q '"health":"true"' ;;
    kube-apiserver) [[ $("${CURL_ADMIN[@]}" "$APISERVER_URL/readyz" 2>/dev/null) == ok ]] ;;
    kube-controller-manager) [[ $(curl -ksS --max-time 3 "https://$CLUSTER_HOST:$KCM_PORT/healthz" 2>/dev/null) == ok ]] ;;
    kube-scheduler) [[ $(curl -ksS --max-time 3 "https://$CLUSTER_HOST:$SCHEDULER_PORT/healthz" 2>/dev/null) == ok ]] ;;
    kwok) curl -fsS --max-time 3 "http://$CLUSTER_HOST:$KWOK_PORT/healthz" >/dev/null 2>&1 ;;
    kueue) curl -fsS --max-time 3 "http://$CLUSTER_HOST:$KUEUE_HEALTH_PORT/readyz" >/dev/null 2>&1 ;;
  esac
}

ports_of() {
  case $1 in
    etcd) echo "$ETCD_CLIENT_PORT $ETCD_PEER_PORT" ;;
    kube-apiserver) echo "$APISERVER_PORT" ;;
    kube-controller-manager) echo "$KCM_PORT" ;;
    kube-scheduler) echo "$SCHEDULER_PORT" ;;
    kwok) echo "$KWOK_PORT" ;;
    kueue) echo "$KUEUE_WEBHOOK_PORT $KUEUE_HEALTH_PORT" ;;
  esac
}

# Wait (bounded, polling) until a component is healthy; fail fast if it exits.
wait_healthy() {
  local name=$1 timeout=$2 deadline=$((SECONDS + $2))
  until healthy "$name"; do
    component_pid "$name" >/dev/null || fail_component "$name" "exited during startup"
    ((SECONDS < deadline)) || fail_component "$name" "is running but not healthy after ${timeout}s"
    sleep 0.5
  done
}

# --- node manifests ----------------------------------------------------------
node_names() {
  local i
  for ((i = 0; i < KWOK_CPU_NODES; i++)); do echo "kwok-cpu-$i"; done
  for ((i = 0; i < KWOK_GPU_NODES; i++)); do echo "kwok-gpu-$i"; done
}

node_manifest() {
  local name=$1 pool=${1#kwok-}
  pool=${pool%-*}
  cat <<YAML
- apiVersion: v1
  kind: Node
  metadata:
    name: $name
    annotations:
      kwok.x-k8s.io/node: fake
      node.alpha.kubernetes.io/ttl: "0"
    labels:
      kubernetes.io/arch: amd64
      kubernetes.io/hostname: $name
      kubernetes.io/os: linux
      type: kwok
      keelson.dev/sim-pool: $pool
YAML
  if [[ $pool == gpu ]]; then
    cat <<YAML
      nvidia.com/gpu.present: "true"
      nvidia.com/gpu.product: $KWOK_GPU_PRODUCT
      nvidia.com/gpu.count: "$KWOK_GPU_PER_NODE"
  spec:
    taints:
    - key: $KWOK_GPU_RESOURCE
      effect: NoSchedule
  status:
YAML
    for field in allocatable capacity; do
      cat <<YAML
    $field:
      cpu: "$KWOK_GPU_NODE_CPU"
      memory: $KWOK_GPU_NODE_MEMORY
      ephemeral-storage: 1Ti
      pods: "$KWOK_NODE_PODS"
      $KWOK_GPU_RESOURCE: "$KWOK_GPU_PER_NODE"
YAML
    done
  else
    echo "  status:"
    for field in allocatable capacity; do
      cat <<YAML
    $field:
      cpu: "$KWOK_CPU_NODE_CPU"
      memory: $KWOK_CPU_NODE_MEMORY
      ephemeral-storage: 1Ti
      pods: "$KWOK_NODE_PODS"
YAML
    done
  fi
}

# Names of the wanted nodes that are not Ready (or absent).
nodes_not_ready() {
  local ready
  ready=$("${KUBECTL[@]}" get nodes -l type=kwok \
    -o jsonpath='{range .items[*]}{.metadata.name}{" "}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' 2>/dev/null |
    awk '$2 == "True" {print $1}') || { node_names; return 0; }
  comm -23 <(node_names | sort) <(sort <<<"$ready")
}

# Simulated nodes beyond the wanted counts (left from a run with more nodes).
surplus_nodes() {
  "${KUBECTL[@]}" get nodes -l type=kwok -o name 2>/dev/null | sed 's#^node/##' |
    { grep -E '^kwok-(cpu|gpu)-[0-9]+$' || true; } | sort | comm -23 - <(node_names | sort)
}

cluster_ready() {
  local c
  [[ -f $KUBECONFIG_FILE ]] || return 1
  for c in "${COMPONENTS[@]}"; do
    component_pid "$c" >/dev/null && healthy "$c" || return 1
  done
  [[ $(cat "$PIDS_DIR/kwok.stages" 2>/dev/null) == "$(stages_sum)" ]] || return 1
  kueue_config_current || return 1
  [[ -z $(nodes_not_ready) && -z $(surplus_nodes) ]]
}

# --- real node mode -------------------------------------------------------------
export REAL_NODE
# How the apiserver must run: on loopback only, or reachable by pods at REAL_NODE_IP.
if [[ $REAL_NODE == 1 ]]; then APISERVER_MODE="real-node $REAL_NODE_IP"; else APISERVER_MODE=loopback; fi
# A changed audit policy is read only by a restarted apiserver.
APISERVER_MODE+=" audit-policy $(sha256sum "$CLUSTER_DIR/audit-policy.yaml" | cut -c1-12)"
# (An apiserver started before this file existed runs on loopback.)
apiserver_mode_ok() { [[ $(cat "$PIDS_DIR/kube-apiserver.mode" 2>/dev/null || echo loopback) == "$APISERVER_MODE" ]]; }

if cluster_ready && apiserver_mode_ok; then
  if [[ $REAL_NODE == 1 ]]; then
    KEELSON_STATE_LOCKED=1 "$CLUSTER_DIR/node-up.sh"
  fi
  log "cluster already up and healthy ($(node_names | wc -l) simulated nodes$([[ $REAL_NODE == 1 ]] && echo ", real node $REAL_NODE_NAME")); nothing to do"
  log "export KUBECONFIG=$KUBECONFIG_FILE"
  exit 0
fi

# --- certificates and kubeconfig --------------------------------------------
CERT_FILES=(ca.crt ca.key apiserver.crt apiserver.key admin.crt admin.key sa.key sa.pub
  front-proxy-ca.crt front-proxy-client.crt front-proxy-client.key)
gen_certs() {
  local f complete=1 c
  for f in "${CERT_FILES[@]}"; do [[ -s $CERTS_DIR/$f ]] || complete=0; done
  ((complete)) && return 0
  for c in "${COMPONENTS[@]}"; do
    component_pid "$c" >/dev/null &&
      die "$c is running but the certificates in $CERTS_DIR are incomplete; run hack/cluster/down.sh, then up.sh"
  done
  log "generating CA, serving and client certificates in $CERTS_DIR"
  rm -rf "$CERTS_DIR"
  mkdir -p "$CERTS_DIR"
  (
    cd "$CERTS_DIR"
    umask 077
    ossl() { openssl "$@" 2>>openssl.log || die "openssl $1 failed; see $CERTS_DIR/openssl.log"; }
    ossl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 3650 \
      -subj "/CN=keelson-local-ca" \
      -addext "basicConstraints=critical,CA:TRUE" \
      -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature"
    # Serving cert of the apiserver: loopback and the in-cluster names.
    cat >apiserver.ext <<EXT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,DNS:localhost,IP:$KUBERNETES_SERVICE_IP,IP:$REAL_NODE_IP,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local
EXT
    cat >client.ext <<EXT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth
EXT
    ossl req -new -newkey rsa:2048 -nodes -keyout apiserver.key -out apiserver.csr -subj "/CN=kube-apiserver"
    ossl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -CAserial ca.srl \
      -days 3650 -extfile apiserver.ext -out apiserver.crt
    ossl req -new -newkey rsa:2048 -nodes -keyout admin.key -out admin.csr -subj "/O=system:masters/CN=keelson-admin"
    ossl x509 -req -in admin.csr -CA ca.crt -CAkey ca.key -CAcreateserial -CAserial ca.srl \
      -days 3650 -extfile client.ext -out admin.crt
    # Front proxy (aggregation layer): its own CA, so that no ordinary client
    # certificate can pass as the proxy.
    ossl req -x509 -newkey rsa:2048 -nodes -keyout front-proxy-ca.key -out front-proxy-ca.crt -days 3650 \
      -subj "/CN=keelson-local-front-proxy-ca" \
      -addext "basicConstraints=critical,CA:TRUE" \
      -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature"
    ossl req -new -newkey rsa:2048 -nodes -keyout front-proxy-client.key -out front-proxy-client.csr -subj "/CN=front-proxy-client"
    ossl x509 -req -in front-proxy-client.csr -CA front-proxy-ca.crt -CAkey front-proxy-ca.key -CAcreateserial \
      -CAserial front-proxy-ca.srl -days 3650 -extfile client.ext -out front-proxy-client.crt
    # Service-account token signing key pair.
    ossl genrsa -out sa.key 2048
    ossl rsa -in sa.key -pubout -out sa.pub
    rm -f ./*.csr ./*.ext
  )
}

write_kubeconfig() {
  local tmp="$KUBECONFIG_FILE.tmp"
  (
    umask 077
    cat >"$tmp" <<KCFG
apiVersion: v1
kind: Config
clusters:
- name: keelson-local
  cluster:
    server: $APISERVER_URL
    certificate-authority-data: $(base64 -w0 <"$CERTS_DIR/ca.crt")
users:
- name: keelson-admin
  user:
    client-certificate-data: $(base64 -w0 <"$CERTS_DIR/admin.crt")
    client-key-data: $(base64 -w0 <"$CERTS_DIR/admin.key")
contexts:
- name: keelson-local
  context:
    cluster: keelson-local
    user: keelson-admin
current-context: keelson-local
KCFG
  )
  mv -f "$tmp" "$KUBECONFIG_FILE"
}

gen_certs
write_kubeconfig

# Certificates from before the real node existed lack its address: re-issue
# the apiserver's serving certificate (same CA, so every client still works).
if [[ $REAL_NODE == 1 ]] && ! openssl x509 -in "$CERTS_DIR/apiserver.crt" -noout -ext subjectAltName 2>/dev/null |
  grep -q "IP Address:$REAL_NODE_IP\b"; then
  log "re-issuing the apiserver serving certificate with $REAL_NODE_IP"
  (
    cd "$CERTS_DIR"
    umask 077
    openssl x509 -in apiserver.crt -noout -ext subjectAltName | tail -n +2 | tr -d ' ' | sed 's/IPAddress:/IP:/g' >san.txt
    printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=%s,IP:%s\n' \
      "$(<san.txt)" "$REAL_NODE_IP" >apiserver.ext
    openssl req -new -key apiserver.key -out apiserver.csr -subj "/CN=kube-apiserver" 2>>openssl.log
    openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAserial ca.srl \
      -days 3650 -extfile apiserver.ext -out apiserver.crt 2>>openssl.log
    rm -f apiserver.csr apiserver.ext san.txt
  ) || die "re-issuing the apiserver certificate failed; see $CERTS_DIR/openssl.log"
  rm -f "$PIDS_DIR/kube-apiserver.mode"
fi

# --- processes ---------------------------------------------------------------
STARTED=()
start() {
  local name=$1 port
  shift
  if component_pid "$name" >/dev/null; then
    return 0
  fi
  for port in $(ports_of "$name"); do
    if [[ -n $(ss -Hltn "sport = :$port" 2>/dev/null) ]]; then
      die "$name: port $CLUSTER_HOST:$port is already in use by another process (see: ss -ltnp 'sport = :$port'); stop it or override the port (hack/cluster/versions.env)"
    fi
  done
  log "starting $name (log: $LOGS_DIR/$name.log)"
  printf '\n===== %s starting %s =====\n' "$(date -u +%FT%TZ)" "$name" >>"$LOGS_DIR/$name.log"
  # setsid: the process outlives the shell (and the make) that started it.
  # 8>&-: the lock on the state dir must not be inherited by the daemon.
  setsid "$BIN_DIR/$name" "$@" >>"$LOGS_DIR/$name.log" 2>&1 </dev/null 8>&- &
  local pid=$! i
  echo "$pid" >"$PIDS_DIR/$name.pid"
  # Until the child has exec'd, /proc/<pid>/exe is bash or setsid, and a
  # health check under load would take the component for dead.
  for ((i = 0; i < 100; i++)); do
    component_pid "$name" >/dev/null && break
    alive "$pid" || break
    sleep 0.05
  done
  STARTED+=("$name")
}

mkdir -p "$ETCD_DATA_DIR"
start etcd \
  --name=keelson-local \
  --data-dir="$ETCD_DATA_DIR" \
  --listen-client-urls="http://$CLUSTER_HOST:$ETCD_CLIENT_PORT" \
  --advertise-client-urls="http://$CLUSTER_HOST:$ETCD_CLIENT_PORT" \
  --listen-peer-urls="http://$CLUSTER_HOST:$ETCD_PEER_PORT" \
  --initial-advertise-peer-urls="http://$CLUSTER_HOST:$ETCD_PEER_PORT" \
  --initial-cluster="keelson-local=http://$CLUSTER_HOST:$ETCD_PEER_PORT" \
  --unsafe-no-fsync \
  --log-level=warn
wait_healthy etcd 30

# The real node's pods reach the apiserver at REAL_NODE_IP through the
# kubernetes Service: it then listens on every address (127.0.0.1 stays usable),
# advertises REAL_NODE_IP, keeps the Service's endpoints itself, and talks to
# the kubelet with the admin client certificate.
if [[ $REAL_NODE == 1 ]]; then
  APISERVER_NET_FLAGS=(--advertise-address="$REAL_NODE_IP" --bind-address=0.0.0.0 --endpoint-reconciler-type=lease
    --kubelet-client-certificate="$CERTS_DIR/admin.crt" --kubelet-client-key="$CERTS_DIR/admin.key")
  ensure_node_iface
else
  APISERVER_NET_FLAGS=(--advertise-address="$CLUSTER_HOST" --bind-address="$CLUSTER_HOST" --endpoint-reconciler-type=none)
fi
if component_pid kube-apiserver >/dev/null && ! apiserver_mode_ok; then
  log "kube-apiserver runs with other flags or audit policy than '$APISERVER_MODE' needs; restarting it"
  stop_component kube-apiserver
fi
start kube-apiserver \
  "${APISERVER_NET_FLAGS[@]}" \
  --secure-port="$APISERVER_PORT" \
  --etcd-servers="http://$CLUSTER_HOST:$ETCD_CLIENT_PORT" \
  --cert-dir="$CERTS_DIR/apiserver-generated" \
  --tls-cert-file="$CERTS_DIR/apiserver.crt" \
  --tls-private-key-file="$CERTS_DIR/apiserver.key" \
  --client-ca-file="$CERTS_DIR/ca.crt" \
  --requestheader-client-ca-file="$CERTS_DIR/front-proxy-ca.crt" \
  --requestheader-allowed-names=front-proxy-client \
  --requestheader-username-headers=X-Remote-User \
  --requestheader-group-headers=X-Remote-Group \
  --requestheader-extra-headers-prefix=X-Remote-Extra- \
  --proxy-client-cert-file="$CERTS_DIR/front-proxy-client.crt" \
  --proxy-client-key-file="$CERTS_DIR/front-proxy-client.key" \
  --authorization-mode=Node,RBAC \
  --service-account-issuer=https://kubernetes.default.svc.cluster.local \
  --service-account-key-file="$CERTS_DIR/sa.pub" \
  --service-account-signing-key-file="$CERTS_DIR/sa.key" \
  --service-cluster-ip-range="$SERVICE_CIDR" \
  --kubelet-preferred-address-types=InternalIP \
  --allow-privileged=true \
  --audit-policy-file="$CLUSTER_DIR/audit-policy.yaml" \
  --audit-log-path="$LOGS_DIR/audit.log" \
  --audit-log-maxsize=500 \
  --audit-log-maxbackup=1 \
  --profiling=false
echo "$APISERVER_MODE" >"$PIDS_DIR/kube-apiserver.mode"
wait_healthy kube-apiserver "$START_TIMEOUT"

COMMON_KUBE_FLAGS=(
  --kubeconfig="$KUBECONFIG_FILE"
  --authentication-kubeconfig="$KUBECONFIG_FILE"
  --authorization-kubeconfig="$KUBECONFIG_FILE"
  --bind-address="$CLUSTER_HOST"
  --leader-elect=false
  --profiling=false
)
start kube-controller-manager "${COMMON_KUBE_FLAGS[@]}" \
  --secure-port="$KCM_PORT" \
  --cert-dir="$CERTS_DIR/kcm-generated" \
  --controllers='*' \
  --use-service-account-credentials=true \
  --service-account-private-key-file="$CERTS_DIR/sa.key" \
  --root-ca-file="$CERTS_DIR/ca.crt" \
  --cluster-signing-cert-file="$CERTS_DIR/ca.crt" \
  --cluster-signing-key-file="$CERTS_DIR/ca.key" \
  --service-cluster-ip-range="$SERVICE_CIDR" \
  --allocate-node-cidrs=false \
  --pvclaimbinder-sync-period=2s \
  --cluster-name=keelson-local
start kube-scheduler "${COMMON_KUBE_FLAGS[@]}" \
  --secure-port="$SCHEDULER_PORT" \
  --cert-dir="$CERTS_DIR/scheduler-generated"
wait_healthy kube-controller-manager 60
wait_healthy kube-scheduler 60

# A kwok started with an older stages.yaml is restarted to load the new one.
if component_pid kwok >/dev/null && [[ $(cat "$PIDS_DIR/kwok.stages" 2>/dev/null) != "$(stages_sum)" ]]; then
  log "$KWOK_STAGES changed since kwok started; restarting kwok"
  stop_component kwok
fi
# kwok manages a node only while it holds the node's Lease; leases left by a
# kwok that is gone would keep a new one waiting up to their 40s duration.
if ! component_pid kwok >/dev/null; then
  old_leases=$("${KUBECTL[@]}" get nodes -l type=kwok -o name 2>/dev/null | sed 's#^node/##') || true
  if [[ -n $old_leases ]]; then
    # shellcheck disable=SC2086
    "${KUBECTL[@]}" -n kube-node-lease delete lease $old_leases --ignore-not-found >/dev/null ||
      log "warning: could not delete the node leases of a previous kwok; nodes may take up to 40s to be managed again"
  fi
fi
start kwok \
  --kubeconfig="$KUBECONFIG_FILE" \
  --config="$KWOK_STAGES" \
  --manage-all-nodes=false \
  --manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake \
  --server-address="$CLUSTER_HOST:$KWOK_PORT" \
  --node-ip="$CLUSTER_HOST" \
  --node-port="$KWOK_PORT" \
  --cidr="$KWOK_POD_CIDR" \
  --node-lease-duration-seconds=40
stages_sum >"$PIDS_DIR/kwok.stages"
wait_healthy kwok 60

# --- simulated nodes ---------------------------------------------------------
surplus=$(surplus_nodes)
if [[ -n $surplus ]]; then
  log "deleting simulated nodes beyond KWOK_CPU_NODES=$KWOK_CPU_NODES KWOK_GPU_NODES=$KWOK_GPU_NODES: $(sort -V <<<"$surplus" | xargs)"
  # shellcheck disable=SC2086
  "${KUBECTL[@]}" delete node $surplus --wait=false >/dev/null
fi
existing=$("${KUBECTL[@]}" get nodes -o name | sed 's#^node/##' | sort) ||
  fail_component kube-apiserver "does not answer 'kubectl get nodes'"
missing=$(comm -23 <(node_names | sort) <(echo "$existing"))
if [[ -n $missing ]]; then
  log "creating simulated nodes: $(sort -V <<<"$missing" | xargs)"
  {
    echo "apiVersion: v1"
    echo "kind: List"
    echo "items:"
    for n in $missing; do node_manifest "$n"; done
  } | "${KUBECTL[@]}" create -f - >/dev/null || fail_component kube-apiserver "refused the simulated nodes"
fi
deadline=$((SECONDS + 120))
while :; do
  pending=$(nodes_not_ready)
  [[ -z $pending ]] && break
  component_pid kwok >/dev/null || fail_component kwok "exited while nodes were being initialised"
  ((SECONDS < deadline)) || fail_component kwok "did not make these nodes Ready within 120s: $(xargs <<<"$pending")"
  sleep 0.5
done

# The ServiceAccount controller creates 'default' in each namespace; pods
# cannot be created before it exists, so wait for it in the default namespace.
deadline=$((SECONDS + 60))
until "${KUBECTL[@]}" get serviceaccount default -n default >/dev/null 2>&1; do
  ((SECONDS < deadline)) || fail_component kube-controller-manager "did not create ServiceAccount default/default within 60s"
  sleep 0.5
done

start_kueue

if ((${#STARTED[@]})); then
  log "started: ${STARTED[*]}"
fi
if [[ $REAL_NODE == 1 ]]; then
  KEELSON_STATE_LOCKED=1 "$CLUSTER_DIR/node-up.sh"
fi
log "cluster up in $((SECONDS - T0))s: $(node_names | wc -l) Ready nodes ($KWOK_CPU_NODES cpu, $KWOK_GPU_NODES gpu)$(
  [[ $REAL_NODE == 1 ]] && echo " + real node $REAL_NODE_NAME"), apiserver $APISERVER_URL"
log "export KUBECONFIG=$KUBECONFIG_FILE   (or: source hack/cluster/env.sh)"
