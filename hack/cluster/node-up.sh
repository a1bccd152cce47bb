#!/usr/bin/env bash
# Join one real node to the local cluster (up.sh runs this when REAL_NODE=1).
# Idempotent. What it changes on the host, and how node-down.sh
# undoes it: docs/real-node.md.
#
#   containerd (Debian, own config/root/state/socket) + runc + CNI plugins
#   CoreDNS (host process on REAL_NODE_IP:53, kubernetes plugin, cluster.local)
#   kube-proxy (iptables mode) and kubelet, built from KUBE_VERSION
#   kube-router, firewall only: NetworkPolicy enforcement (iptables + ipset)
#   node REAL_NODE_NAME, tainted keelson.dev/real-node=true:NoSchedule and
#   labelled keelson.dev/real-node=true
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

T0=$SECONDS
[[ $EUID == 0 ]] || die "the real node needs root (containerd, iptables, mounts)"
[[ ${KEELSON_STATE_LOCKED:-} == 1 ]] || lock_state
[[ -s $KUBECONFIG_FILE && -s $CERTS_DIR/ca.key ]] || die "the control plane is not up; run make cluster (REAL_NODE=1)"
for b in "${NODE_BINARIES[@]}" kubectl; do
  [[ -x $BIN_DIR/$b ]] || die "missing $BIN_DIR/$b; run REAL_NODE=1 hack/cluster/build.sh"
done
mkdir -p "$NODE_STATE" "$PIDS_DIR" "$LOGS_DIR"
KUBECTL=("$BIN_DIR/kubectl" --kubeconfig "$KUBECONFIG_FILE" --request-timeout=10s)

# --- packages ----------------------------------------------------------------
need_pkgs=()
for pair in containerd:containerd runc:runc iptables:iptables conntrack:conntrack ctr:containerd \
  gcc:gcc python3:python3 findmnt:util-linux ip:iproute2 ipset:ipset; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || need_pkgs+=("${pair#*:}")
done
for plugin in bridge host-local portmap loopback; do
  [[ -x $CNI_BIN_DIR/$plugin ]] || need_pkgs+=(containernetworking-plugins)
done
[[ -f /usr/lib/x86_64-linux-gnu/libc.a ]] || need_pkgs+=(libc6-dev)
if ((${#need_pkgs[@]})); then
  mapfile -t need_pkgs < <(printf '%s\n' "${need_pkgs[@]}" | sort -u)
  log "installing Debian packages: ${need_pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null || die "apt-get update failed"
  apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null || die "apt-get install ${need_pkgs[*]} failed"
fi

# --- one real node per host --------------------------------------------------
OWNER_FILE="$NODE_VAR/owner"
if [[ -s $OWNER_FILE && $(<"$OWNER_FILE") != "$CLUSTER_STATE" ]]; then
  other=$(<"$OWNER_FILE")
  for c in "${NODE_COMPONENTS[@]}"; do
    if (PIDS_DIR="$other/pids" component_pid "$c" >/dev/null); then
      die "the real node of another checkout ($other) runs on this host; run its hack/cluster/down.sh first"
    fi
  done
  # Its processes are gone (a session or machine stopped) but its host changes
  # are not: undo them with its own records first.
  log "cleaning up after the real node of $other, which no longer runs"
  CLUSTER_STATE=$other KEELSON_STATE_LOCKED=1 "$CLUSTER_DIR/node-down.sh" ||
    log "warning: cleaning up after $other failed; continuing"
fi
mkdir -p "$NODE_VAR"
echo "$CLUSTER_STATE" >"$OWNER_FILE"

# --- record what gets changed, once per up/down cycle -------------------------
# Host paths the kubelet, containerd and the CNI plugins create at fixed places.
FIXED_PATHS=(/var/lib/kubelet /var/log/containers /var/log/pods /run/containerd /var/lib/cni /run/netns
  /usr/libexec/kubernetes /etc/cni /opt/cni /opt/containerd)
if [[ ! -f $NODE_STATE/created-paths ]]; then
  for p in "${FIXED_PATHS[@]}"; do [[ -e $p ]] || echo "$p"; done >"$NODE_STATE/created-paths.tmp"
  mv "$NODE_STATE/created-paths.tmp" "$NODE_STATE/created-paths"
fi
# ipsets that exist before kube-router runs are never destroyed by node-down.sh.
if [[ ! -f $NODE_STATE/ipsets.saved ]]; then
  ipset list -n 2>/dev/null | sort >"$NODE_STATE/ipsets.saved.tmp" || true
  mv "$NODE_STATE/ipsets.saved.tmp" "$NODE_STATE/ipsets.saved"
fi
if [[ ! -f $NODE_STATE/sysctl.saved ]]; then
  for s in "${NODE_SYSCTLS[@]}"; do
    v=$(sysctl -n "$s" 2>/dev/null) && printf '%s=%s\n' "$s" "$v"
  done >"$NODE_STATE/sysctl.saved.tmp"
  mv "$NODE_STATE/sysctl.saved.tmp" "$NODE_STATE/sysctl.saved"
fi

# --- host network ------------------------------------------------------------
ensure_node_iface
# Service addresses that no kube-proxy rule rewrote go to the dummy device
# (which drops them) instead of the default route; simulated pod addresses
# of kwok nodes are unreachable. Nothing of the cluster ever leaves the host.
ip route replace "$SERVICE_CIDR" dev "$REAL_NODE_IFACE"
ip route replace unreachable "$KWOK_POD_CIDR"
sysctl -qw net.ipv4.ip_forward=1
sysctl -qw net.bridge.bridge-nf-call-iptables=1 2>/dev/null || log "warning: net.bridge.bridge-nf-call-iptables is not available; pod-to-service traffic on the bridge may not be rewritten"
sysctl -qw net.bridge.bridge-nf-call-ip6tables=1 2>/dev/null || true

# --- certificates and kubeconfigs --------------------------------------------
NODE_CERTS="$NODE_STATE/certs"
mkdir -p "$NODE_CERTS"
issue_client_cert() { # name subject
  local name=$1 subj=$2
  [[ -s $NODE_CERTS/$name.crt && $NODE_CERTS/$name.crt -nt $CERTS_DIR/ca.crt ]] && return 0
  (
    cd "$NODE_CERTS"
    umask 077
    printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n' >"$name.ext"
    openssl req -new -newkey rsa:2048 -nodes -keyout "$name.key" -out "$name.csr" -subj "$subj" 2>>openssl.log
    openssl x509 -req -in "$name.csr" -CA "$CERTS_DIR/ca.crt" -CAkey "$CERTS_DIR/ca.key" -CAcreateserial \
      -CAserial "$NODE_CERTS/ca.srl" -days 3650 -extfile "$name.ext" -out "$name.crt" 2>>openssl.log
    rm -f "$name.csr" "$name.ext"
  ) || die "issuing the $name certificate failed; see $NODE_CERTS/openssl.log"
}
write_kubeconfig_for() { # name user
  local name=$1 user=$2
  (
    umask 077
    cat >"$NODE_STATE/$name.kubeconfig" <<KCFG
apiVersion: v1
kind: Config
clusters:
- name: keelson-local
  cluster:
    server: $APISERVER_URL
    certificate-authority: $CERTS_DIR/ca.crt
users:
- name: $user
  user:
    client-certificate: $NODE_CERTS/$name.crt
    client-key: $NODE_CERTS/$name.key
contexts:
- name: keelson-local
  context: {cluster: keelson-local, user: $user}
current-context: keelson-local
KCFG
  )
}
issue_client_cert kubelet "/O=system:nodes/CN=system:node:$REAL_NODE_NAME"
issue_client_cert kube-proxy "/CN=system:kube-proxy"
issue_client_cert coredns "/CN=keelson:coredns"
issue_client_cert kube-router "/CN=keelson:kube-router"
write_kubeconfig_for kubelet "system:node:$REAL_NODE_NAME"
write_kubeconfig_for kube-proxy system:kube-proxy
write_kubeconfig_for coredns keelson:coredns
write_kubeconfig_for kube-router keelson:kube-router

# CoreDNS reads Services, EndpointSlices, Pods and Namespaces.
"${KUBECTL[@]}" apply -f - >/dev/null <<'YAML' || die "cannot apply the CoreDNS RBAC"
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: "keelson:coredns", labels: {app.kubernetes.io/part-of: keelson-real-node}}
rules:
- {apiGroups: [""], resources: [endpoints, services, pods, namespaces], verbs: [list, watch]}
- {apiGroups: [discovery.k8s.io], resources: [endpointslices], verbs: [list, watch]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "keelson:coredns", labels: {app.kubernetes.io/part-of: keelson-real-node}}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "keelson:coredns"}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: "keelson:coredns"}
YAML

# kube-router reads; it never writes. It enforces from Pods, Namespaces, NetworkPolicies and its
# Node; it also starts informers on Services, Endpoints and EndpointSlices whatever it runs, and
# waits for them to sync, so it lists and watches those too.
"${KUBECTL[@]}" apply -f - >/dev/null <<'YAML' || die "cannot apply the kube-router RBAC"
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: "keelson:kube-router", labels: {app.kubernetes.io/part-of: keelson-real-node}}
rules:
- {apiGroups: [""], resources: [pods, namespaces, nodes], verbs: [get, list, watch]}
- {apiGroups: [networking.k8s.io], resources: [networkpolicies], verbs: [get, list, watch]}
- {apiGroups: [""], resources: [services, endpoints], verbs: [list, watch]}
- {apiGroups: [discovery.k8s.io], resources: [endpointslices], verbs: [list, watch]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "keelson:kube-router", labels: {app.kubernetes.io/part-of: keelson-real-node}}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "keelson:kube-router"}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: "keelson:kube-router"}
YAML

# --- processes ---------------------------------------------------------------
STARTED=()
start_node() { # name binary args...
  local name=$1 bin=$2
  shift 2
  component_pid "$name" >/dev/null && return 0
  log "starting $name (log: $LOGS_DIR/$name.log)"
  printf '\n===== %s starting %s =====\n' "$(date -u +%FT%TZ)" "$name" >>"$LOGS_DIR/$name.log"
  setsid "$bin" "$@" >>"$LOGS_DIR/$name.log" 2>&1 </dev/null 8>&- 9>&- &
  local pid=$! i
  echo "$pid" >"$PIDS_DIR/$name.pid"
  # Wait for the exec: until then /proc/<pid>/exe is bash or setsid.
  for ((i = 0; i < 100; i++)); do
    component_pid "$name" >/dev/null && break
    alive "$pid" || break
    sleep 0.05
  done
  STARTED+=("$name")
}
wait_for() { # name timeout command...
  local name=$1 timeout=$2 deadline=$((SECONDS + $2))
  shift 2
  until "$@" >/dev/null 2>&1; do
    if ! component_pid "$name" >/dev/null; then
      tail -n 30 "$LOGS_DIR/$name.log" | sed 's/^/    /' >&2
      die "$name exited during startup (log: $LOGS_DIR/$name.log)"
    fi
    if ((SECONDS >= deadline)); then
      tail -n 30 "$LOGS_DIR/$name.log" | sed 's/^/    /' >&2
      die "$name is not ready after ${timeout}s (log: $LOGS_DIR/$name.log)"
    fi
    sleep 0.5
  done
}

# Write stdin to a file only when its content changes: kube-proxy exits when its
# config file is rewritten, and a rerun must leave a running node alone.
write_if_changed() {
  local f=$1
  cat >"$f.new"
  if cmp -s "$f.new" "$f"; then rm -f "$f.new"; else mv -f "$f.new" "$f"; fi
}

# containerd ---------------------------------------------------------------------
mkdir -p "$CONTAINERD_ROOT" "$CONTAINERD_STATE" "$CNI_CONF_DIR" "$NODE_VAR/cni/networks"
write_if_changed "$NODE_STATE/containerd.toml" <<TOML
# containerd of the keelson real node (hack/cluster/node-up.sh)
version = 2
root = "$CONTAINERD_ROOT"
state = "$CONTAINERD_STATE"
oom_score = 0

[grpc]
  address = "$CONTAINERD_SOCK"

[ttrpc]
  address = ""

[debug]
  address = ""

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "$NODE_VAR/containerd-opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  # root here lacks CAP_SYS_RESOURCE: without this runc fails with
  # "can't get final child's PID from pipe: EOF".
  restrict_oom_score_adj = true
  enable_selinux = false
  disable_apparmor = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  max_container_log_line_size = 16384

  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false

  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$CNI_BIN_DIR"
    conf_dir = "$CNI_CONF_DIR"
    max_conf_num = 1
TOML
write_if_changed "$CNI_CONF_DIR/10-keelson.conflist" <<JSON
{
  "cniVersion": "1.0.0",
  "name": "$CNI_NETWORK",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$REAL_NODE_BRIDGE",
      "isGateway": true,
      "ipMasq": true,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "$NODE_VAR/cni/networks",
        "ranges": [[{"subnet": "$REAL_NODE_POD_CIDR"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
JSON
start_node containerd "$(command -v containerd)" --config "$NODE_STATE/containerd.toml"
wait_for containerd 60 ctr --address "$CONTAINERD_SOCK" version

# The sandbox image, then the node's stand-in workload images.
if ! ctr --address "$CONTAINERD_SOCK" -n k8s.io images ls -q | grep -qx "$PAUSE_IMAGE"; then
  "$REPO_ROOT/hack/images/build.sh" pause
fi
if [[ ${REAL_NODE_IMAGES:-1} == 1 ]]; then
  missing_images=()
  for img in modelserver notebook trainer; do
    ctr --address "$CONTAINERD_SOCK" -n k8s.io images ls -q | grep -qx "keelson.dev/$img:dev" || missing_images+=("$img")
  done
  ((${#missing_images[@]} == 0)) || "$REPO_ROOT/hack/images/build.sh" "${missing_images[@]}"
fi

# CoreDNS ------------------------------------------------------------------------
write_if_changed "$NODE_STATE/Corefile" <<COREFILE
# CoreDNS of the keelson real node (hack/cluster/node-up.sh). Answers only
# for the cluster; every other name is NXDOMAIN (nothing is forwarded).
$CLUSTER_DOMAIN:53 in-addr.arpa:53 ip6.arpa:53 {
    bind $REAL_NODE_IP
    errors
    health 127.0.0.1:$COREDNS_HEALTH_PORT
    kubernetes $CLUSTER_DOMAIN in-addr.arpa ip6.arpa {
        kubeconfig $NODE_STATE/coredns.kubeconfig keelson-local
        pods insecure
        ttl 5
    }
    cache 5
    loadbalance
}
.:53 {
    bind $REAL_NODE_IP
    errors
    template ANY ANY {
        rcode NXDOMAIN
    }
}
COREFILE
start_node coredns "$BIN_DIR/coredns" -conf "$NODE_STATE/Corefile"
wait_for coredns 60 curl -fsS --max-time 2 "http://127.0.0.1:$COREDNS_HEALTH_PORT/health"

# kubelet ------------------------------------------------------------------------
mkdir -p "$KUBELET_ROOT" "$NODE_VAR/pod-logs" "$NODE_STATE/kubelet-pki"
printf 'nameserver %s\n' "$REAL_NODE_IP" | write_if_changed "$NODE_STATE/resolv.conf"
write_if_changed "$NODE_STATE/kubelet.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $REAL_NODE_IP
port: $KUBELET_PORT
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $KUBELET_HEALTHZ_PORT
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $CERTS_DIR/ca.crt}
authorization:
  mode: Webhook
cgroupDriver: cgroupfs
failSwapOn: false
containerRuntimeEndpoint: unix://$CONTAINERD_SOCK
imageServiceEndpoint: unix://$CONTAINERD_SOCK
clusterDNS: ["$REAL_NODE_IP"]
clusterDomain: $CLUSTER_DOMAIN
resolvConf: $NODE_STATE/resolv.conf
podLogsDir: $NODE_VAR/pod-logs
volumePluginDir: $KUBELET_ROOT/volume-plugins
staticPodPath: ""
maxPods: 50
serializeImagePulls: false
# Images come from ctr import (imagePullPolicy: Never): never collect them.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard:
  memory.available: 100Mi
  nodefs.available: 1%
  nodefs.inodesFree: 1%
  imagefs.available: 1%
evictionPressureTransitionPeriod: 10s
registerWithTaints:
- {key: keelson.dev/real-node, value: "true", effect: NoSchedule}
nodeStatusUpdateFrequency: 10s
runtimeRequestTimeout: 2m
shutdownGracePeriod: 0s
YAML
start_node kubelet "$BIN_DIR/kubelet" \
  --config="$NODE_STATE/kubelet.yaml" \
  --kubeconfig="$NODE_STATE/kubelet.kubeconfig" \
  --root-dir="$KUBELET_ROOT" \
  --cert-dir="$NODE_STATE/kubelet-pki" \
  --hostname-override="$REAL_NODE_NAME" \
  --node-ip="$REAL_NODE_IP" \
  --node-labels="$REAL_NODE_LABEL,keelson.dev/node-type=real"
wait_for kubelet 60 curl -fsS --max-time 2 "http://127.0.0.1:$KUBELET_HEALTHZ_PORT/healthz"
# kube-proxy after the kubelet registered the Node: it takes its node IP from
# the Node object (and would wait 30s for it, then exit when it appears).
wait_for kubelet 60 "${KUBECTL[@]}" get node "$REAL_NODE_NAME"

# kube-proxy ---------------------------------------------------------------------
write_if_changed "$NODE_STATE/kube-proxy.yaml" <<YAML
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection:
  kubeconfig: $NODE_STATE/kube-proxy.kubeconfig
hostnameOverride: $REAL_NODE_NAME
mode: iptables
clusterCIDR: $REAL_NODE_POD_CIDR
healthzBindAddress: 127.0.0.1:$KUBE_PROXY_HEALTHZ_PORT
metricsBindAddress: 127.0.0.1:$KUBE_PROXY_METRICS_PORT
nodePortAddresses: ["$REAL_NODE_IP/32"]
iptables:
  localhostNodePorts: false
  syncPeriod: 30s
  minSyncPeriod: 1s
# Leave the host's conntrack sysctls alone.
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
YAML
start_node kube-proxy "$BIN_DIR/kube-proxy" --config="$NODE_STATE/kube-proxy.yaml"
wait_for kube-proxy 60 curl -fsS --max-time 2 "http://127.0.0.1:$KUBE_PROXY_HEALTHZ_PORT/livez"

# kube-router ----------------------------------------------------------------------
# NetworkPolicy enforcement only: no BGP router, no service proxy (kube-proxy is
# the proxy), no health or metrics port: it listens on nothing. It filters the
# pods of this node in the filter table (chains KUBE-ROUTER-*, KUBE-NWPLCY-*,
# KUBE-POD-FW-*) with ipsets KUBE-SRC-*/KUBE-DST-*; traffic from the node itself
# (kubelet probes, the host's tests, the operator run as a local process) is
# let through, as kube-router always does.
start_node kube-router "$BIN_DIR/kube-router" \
  --kubeconfig="$NODE_STATE/kube-router.kubeconfig" \
  --hostname-override="$REAL_NODE_NAME" \
  --run-firewall=true --run-router=false --run-service-proxy=false \
  --enable-ipv4=true --enable-ipv6=false \
  --service-cluster-ip-range="$SERVICE_CIDR" \
  --health-port=0 --metrics-port=0
# Ready once its policy chains exist: it makes them after its caches synced.
wait_for kube-router 60 iptables -t filter -S KUBE-ROUTER-FORWARD


node_ready() {
  [[ $("${KUBECTL[@]}" get node "$REAL_NODE_NAME" \
    -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null) == True ]]
}
wait_for kubelet 120 node_ready

# The kubernetes Service must have the advertised address as its endpoint.
wait_for kubelet 60 bash -c "'$BIN_DIR/kubectl' --kubeconfig '$KUBECONFIG_FILE' get endpointslice -n default -l kubernetes.io/service-name=kubernetes -o jsonpath='{.items[*].endpoints[*].addresses[*]}' | grep -qw '$REAL_NODE_IP'"

((${#STARTED[@]} == 0)) || log "started: ${STARTED[*]}"
log "real node $REAL_NODE_NAME Ready in $((SECONDS - T0))s (node IP $REAL_NODE_IP, pods $REAL_NODE_POD_CIDR, DNS $REAL_NODE_IP:53, taint $REAL_NODE_TAINT)"
