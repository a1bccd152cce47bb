# Source this file to use the local cluster from a shell:
#   source hack/cluster/env.sh
#   kubectl get nodes
# It exports KUBECONFIG (target/cluster/kubeconfig, cluster-admin) and puts
# target/cluster/bin (kubectl, kube-apiserver, etcd, kwok, ...) first on PATH.
# shellcheck shell=bash
_keelson_cluster_dir="$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")" && pwd)"
_keelson_state="${CLUSTER_STATE:-$(cd "$_keelson_cluster_dir/../.." && pwd)/target/cluster}"
export KUBECONFIG="$_keelson_state/kubeconfig"
case ":$PATH:" in
  *":$_keelson_state/bin:"*) ;;
  *) export PATH="$_keelson_state/bin:$PATH" ;;
esac
unset _keelson_cluster_dir _keelson_state
