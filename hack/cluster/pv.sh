#!/usr/bin/env bash
# Create a hostPath PersistentVolume on the local cluster.
#
#   hack/cluster/pv.sh NAME SIZE [--class CLASS] [--claim NAMESPACE/PVC]
#
# The cluster has no storage provisioner: a PersistentVolumeClaim binds only
# to a PersistentVolume that exists. The volume offers every access mode
# (ReadWriteOnce, ReadOnlyMany, ReadWriteMany), so any claim that asks for at
# most SIZE and the same storage class (none by default) can bind to it.
# --claim pre-binds it to one claim. Reclaim policy is Retain: once its claim
# is deleted the volume is Released; delete it with kubectl delete pv NAME.
# Nothing mounts the path: the nodes are simulated.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
(($# >= 2)) || usage
name=$1 size=$2
shift 2
class="" claim=""
while (($#)); do
  case $1 in
    --class) class=${2:?--class needs a value}; shift 2 ;;
    --claim) claim=${2:?--claim needs NAMESPACE/NAME}; shift 2 ;;
    *) usage ;;
  esac
done
[[ $name =~ ^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$ ]] || die "invalid PV name '$name' (lowercase DNS name)"
[[ $size =~ ^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$ ]] || die "invalid size '$size' (e.g. 10Gi)"
[[ -f $KUBECONFIG_FILE ]] || die "no kubeconfig at $KUBECONFIG_FILE; start the cluster first (make cluster)"

{
  cat <<YAML
apiVersion: v1
kind: PersistentVolume
metadata:
  name: $name
  labels:
    keelson.dev/sim-volume: "true"
spec:
  capacity:
    storage: $size
  accessModes: [ReadWriteOnce, ReadOnlyMany, ReadWriteMany]
  persistentVolumeReclaimPolicy: Retain
  volumeMode: Filesystem
  storageClassName: "$class"
  hostPath:
    path: $CLUSTER_STATE/volumes/$name
    type: DirectoryOrCreate
YAML
  if [[ -n $claim ]]; then
    [[ $claim == */* ]] || die "--claim wants NAMESPACE/NAME, got '$claim'"
    cat <<YAML
  claimRef:
    namespace: ${claim%%/*}
    name: ${claim#*/}
YAML
  fi
} | "$BIN_DIR/kubectl" --kubeconfig "$KUBECONFIG_FILE" apply -f -
