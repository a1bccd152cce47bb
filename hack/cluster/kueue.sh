# Kueue on the local cluster (docs/kueue.md). Sourced by up.sh once kwok is
# up; uses up.sh's start, wait_healthy and KUBECTL.
#
#   1. Kueue's CRDs from its module source (build.sh copied them into the
#      cache), with the conversion webhooks that Kueue's own kustomization
#      enables, pointed at the local process (the other CRDs convert nothing);
#   2. a serving certificate for 127.0.0.1 signed by the cluster CA
#      (certs/kueue/tls.*), and the configuration file (kueue/config.yaml);
#   3. the kueue process on 127.0.0.1 (webhooks on KUEUE_WEBHOOK_PORT, health
#      probes on KUEUE_HEALTH_PORT, metrics off);
#   4. the admission webhooks of Kueue's own API (ClusterQueue, Cohort,
#      ResourceFlavor, Workload) with clientConfig.url https://127.0.0.1:<port>.
#
# Kueue's internal certificate management is off: it issues a certificate for
# <service>.<namespace>.svc only, which the API server cannot use to reach a
# process on loopback (no Service routes here). With it off, Kueue v0.17.0
# reads a metrics serving certificate from the fixed path
# /etc/kueue/metrics/certs (cmd/kueue/main.go) even though its metrics server
# is off here, so a self-signed one is written there once if it is missing.
# shellcheck shell=bash

KUEUE_CFG_DIR="$KUEUE_CACHE_DIR/config"
KUEUE_STATE="$CLUSTER_STATE/kueue"
KUEUE_CERT_DIR="$CERTS_DIR/kueue"
KUEUE_METRICS_CERTS=/etc/kueue/metrics/certs
# The TrainingJob kind, as Kueue's integrations.externalFrameworks names it.
KUEUE_EXTERNAL_FRAMEWORK=TrainingJob.v1alpha1.keelson.dev

kueue_config() {
  cat <<YAML
apiVersion: config.kueue.x-k8s.io/v1beta2
kind: Configuration
namespace: kueue-system
health:
  healthProbeBindAddress: $CLUSTER_HOST:$KUEUE_HEALTH_PORT
metrics:
  bindAddress: "0"
webhook:
  host: $CLUSTER_HOST
  port: $KUEUE_WEBHOOK_PORT
  certDir: $KUEUE_CERT_DIR
leaderElection:
  leaderElect: false
internalCertManagement:
  enable: false
featureGates:
  # The visibility API server would listen on every address (port 8082).
  VisibilityOnDemand: false
# All-or-nothing by timeout (docs/kueue.md): an admitted Workload whose pods are not all ready
# within the timeout is evicted (PodsReadyTimeout) and queued again after a backoff. The operator
# sets PodsReady on its TrainingJobs' Workloads as Kueue's jobframework does. No blockAdmission:
# ClusterQueues of concurrent tests must not wait for each other. No recoveryTimeout: a worker
# lost after the start is restarted against runPolicy.backoffLimit.
waitForPodsReady:
  timeout: 60s
  blockAdmission: false
  recoveryTimeout: 0s
integrations:
  frameworks:
  - batch/job
  externalFrameworks:
  - $KUEUE_EXTERNAL_FRAMEWORK
YAML
}

kueue_certs() {
  if [[ ! -s $KUEUE_CERT_DIR/tls.crt || ! -s $KUEUE_CERT_DIR/tls.key ]]; then
    log "issuing Kueue's webhook serving certificate in $KUEUE_CERT_DIR"
    mkdir -p "$KUEUE_CERT_DIR"
    (
      cd "$KUEUE_CERT_DIR"
      umask 077
      printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:%s,DNS:localhost\n' \
        "$CLUSTER_HOST" >tls.ext
      openssl req -new -newkey rsa:2048 -nodes -keyout tls.key -out tls.csr -subj "/CN=kueue-webhook" 2>>openssl.log &&
        openssl x509 -req -in tls.csr -CA "$CERTS_DIR/ca.crt" -CAkey "$CERTS_DIR/ca.key" -CAserial "$CERTS_DIR/ca.srl" \
          -days 3650 -extfile tls.ext -out tls.crt 2>>openssl.log
      rc=$?
      rm -f tls.csr tls.ext
      exit $rc
    ) || die "issuing Kueue's certificate failed; see $KUEUE_CERT_DIR/openssl.log"
  fi
  if [[ ! -s $KUEUE_METRICS_CERTS/tls.crt || ! -s $KUEUE_METRICS_CERTS/tls.key ]]; then
    log "writing a self-signed certificate to $KUEUE_METRICS_CERTS (Kueue reads it at start; its metrics server is off)"
    mkdir -p "$KUEUE_METRICS_CERTS" 2>/dev/null && [[ -w $KUEUE_METRICS_CERTS ]] ||
      die "cannot write $KUEUE_METRICS_CERTS: create it once as root (mkdir -p $KUEUE_METRICS_CERTS) and give it to $(id -un)"
    (
      umask 077
      openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=kueue-metrics" \
        -keyout "$KUEUE_METRICS_CERTS/tls.key" -out "$KUEUE_METRICS_CERTS/tls.crt" 2>/dev/null
    ) || die "writing $KUEUE_METRICS_CERTS failed"
  fi
}

# The webhook manifests of Kueue's module with the Service reference replaced
# by the local URL and the cluster CA.
kueue_webhooks() {
  local kind=$1 file=$2 ca
  ca=$(base64 -w0 <"$CERTS_DIR/ca.crt")
  echo "apiVersion: admissionregistration.k8s.io/v1"
  echo "kind: ${kind}WebhookConfiguration"
  echo "metadata:"
  echo "  name: kueue-${kind,,}-webhook-configuration"
  echo "webhooks:"
  sed -e '/^    service:$/d' -e '/^      name: webhook-service$/d' -e '/^      namespace: system$/d' \
    -e "s#^      path: \\(.*\\)#    url: https://$CLUSTER_HOST:$KUEUE_WEBHOOK_PORT\\1\\n    caBundle: $ca#" "$file"
}

start_kueue() {
  [[ -f $KUEUE_CFG_DIR/.complete ]] || die "Kueue's manifests are missing in $KUEUE_CFG_DIR; run hack/cluster/build.sh"
  mkdir -p "$KUEUE_STATE"
  kueue_certs
  kueue_config >"$KUEUE_STATE/config.yaml"
  local sum ca crd patch
  sum=$(cat "$KUEUE_STATE/config.yaml" "$KUEUE_CFG_DIR/.complete" | sha256sum | cut -d' ' -f1)
  if component_pid kueue >/dev/null && [[ $(cat "$PIDS_DIR/kueue.config" 2>/dev/null) != "$sum" ]]; then
    log "Kueue's configuration changed since it started; restarting kueue"
    stop_component kueue
  fi
  if ! component_pid kueue >/dev/null; then
    "${KUBECTL[@]}" apply --server-side --force-conflicts -f "$KUEUE_CFG_DIR/crds" >/dev/null ||
      fail_component kube-apiserver "refused Kueue's CRDs"
    ca=$(base64 -w0 <"$CERTS_DIR/ca.crt")
    for file in "$KUEUE_CFG_DIR"/crds/kueue.x-k8s.io_*.yaml; do
      crd=${file##*/kueue.x-k8s.io_}
      crd=${crd%.yaml}.kueue.x-k8s.io
      if grep -qx "$crd" "$KUEUE_CFG_DIR/conversion-crds.txt"; then
        patch='{"spec":{"conversion":{"strategy":"Webhook","webhook":{"conversionReviewVersions":["v1"],"clientConfig":{"url":"https://'"$CLUSTER_HOST:$KUEUE_WEBHOOK_PORT"'/convert","caBundle":"'"$ca"'"}}}}}'
      else
        patch='{"spec":{"conversion":{"strategy":"None","webhook":null}}}'
      fi
      "${KUBECTL[@]}" patch crd "$crd" --type=merge -p "$patch" >/dev/null ||
        fail_component kube-apiserver "refused the conversion settings of $crd"
    done
    "${KUBECTL[@]}" wait --for=condition=Established --timeout=60s -f "$KUEUE_CFG_DIR/crds" >/dev/null ||
      fail_component kube-apiserver "did not establish Kueue's CRDs within 60s"
  fi
  start kueue --config="$KUEUE_STATE/config.yaml" --kubeconfig="$KUBECONFIG_FILE"
  echo "$sum" >"$PIDS_DIR/kueue.config"
  wait_healthy kueue "$START_TIMEOUT"
  {
    kueue_webhooks Mutating "$KUEUE_CFG_DIR/mutating-webhooks.yaml"
    echo "---"
    kueue_webhooks Validating "$KUEUE_CFG_DIR/validating-webhooks.yaml"
  } | "${KUBECTL[@]}" apply --server-side --force-conflicts -f - >/dev/null ||
    fail_component kube-apiserver "refused Kueue's webhook configurations"
}

# The sum a running kueue was started with matches the configuration now.
kueue_config_current() {
  [[ $(cat "$PIDS_DIR/kueue.config" 2>/dev/null) == "$(cat <(kueue_config) "$KUEUE_CFG_DIR/.complete" 2>/dev/null | sha256sum | cut -d' ' -f1)" ]]
}
