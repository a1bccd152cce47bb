#!/usr/bin/env bash
# Take the real node down and put the host back as node-up.sh found it
# (down.sh runs this first). Idempotent; safe when no real node ever ran.
# docs/real-node.md lists each change and its undo.
#
#   1. stop the kubelet (so it restarts nothing)
#   2. crictl rmp -af: stop and remove every pod sandbox through the CRI, so
#      the CNI plugins delete the veths, netns and IP allocations
#   3. stop kube-router, kube-proxy, CoreDNS, containerd
#   4. unmount what is left under the kubelet and containerd dirs and CNI netns
#   5. iptables: rules and chains named KUBE-* and CNI-* (kube-router's
#      KUBE-ROUTER-*, KUBE-NWPLCY-*, KUBE-POD-FW-* among them), then the ipsets
#      kube-router made
#   6. sysctls back to the values recorded before the first node-up.sh
#   7. the CNI bridge, leftover veths, the dummy interface and the routes
#   8. the kubepods cgroups, the node's dirs and the fixed host paths that
#      did not exist before
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
trap - ERR
set +o errtrace

[[ ${KEELSON_STATE_LOCKED:-} == 1 ]] || lock_state

# Is there anything to do?
any=0
for c in "${NODE_COMPONENTS[@]}"; do component_pid "$c" >/dev/null && any=1; done
[[ -d $NODE_STATE || -d $NODE_VAR || -S $CONTAINERD_SOCK ]] && any=1
ip link show "$REAL_NODE_IFACE" >/dev/null 2>&1 && any=1
((any)) || exit 0
if [[ -s $NODE_VAR/owner && $(<"$NODE_VAR/owner") != "$CLUSTER_STATE" ]]; then
  other=$(<"$NODE_VAR/owner")
  for c in "${NODE_COMPONENTS[@]}"; do
    if (PIDS_DIR="$other/pids" component_pid "$c" >/dev/null); then
      log "the real node on this host belongs to $other; leaving it alone (run its hack/cluster/down.sh)"
      exit 0
    fi
  done
fi
[[ $EUID == 0 ]] || die "taking the real node down needs root"
log "taking the real node $REAL_NODE_NAME down"

# 1. kubelet first: it would otherwise restart what is removed below.
stop_component kubelet || true

# 2. Every pod through the CRI (CNI DEL removes each pod's veth, netns and IP).
if component_pid containerd >/dev/null && [[ -x $BIN_DIR/crictl ]]; then
  CRICTL=("$BIN_DIR/crictl" --runtime-endpoint "unix://$CONTAINERD_SOCK" --image-endpoint "unix://$CONTAINERD_SOCK" --timeout 30s)
  if pods=$("${CRICTL[@]}" pods -q 2>/dev/null) && [[ -n $pods ]]; then
    log "removing $(wc -l <<<"$pods") pod sandboxes (crictl rmp -af)"
    "${CRICTL[@]}" rmp -af >/dev/null 2>&1 || log "warning: crictl rmp -af failed; cleaning up by hand below"
  fi
fi

# The Node object, while the apiserver still answers (down.sh wipes etcd anyway).
if [[ -s $KUBECONFIG_FILE && -x $BIN_DIR/kubectl ]]; then
  "$BIN_DIR/kubectl" --kubeconfig "$KUBECONFIG_FILE" --request-timeout=5s delete node "$REAL_NODE_NAME" \
    --ignore-not-found --wait=false >/dev/null 2>&1 || true
fi

# 3. The rest of the node's processes.
for c in kube-router kube-proxy coredns containerd; do stop_component "$c" || true; done
# containerd-shim processes of our containerd (normally gone with their pods).
for p in $(pgrep -x containerd-shim-runc-v2 2>/dev/null || true); do
  if tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | grep -q -- "-address $CONTAINERD_SOCK"; then
    log "killing leftover shim $p"
    kill -KILL "$p" 2>/dev/null || true
  fi
done

# 4. Mounts left under the node's dirs (deepest first), and CNI netns.
umount_under() {
  local prefix m
  for prefix in "$@"; do
    findmnt -rn -o TARGET 2>/dev/null | awk -v p="$prefix" 'index($0, p "/") == 1 || $0 == p' | sort -r |
      while read -r m; do
        m=$(printf '%b' "$m") # findmnt escapes spaces as \x20
        umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || log "warning: could not unmount $m"
      done
  done
}
umount_under "$KUBELET_ROOT" "$CONTAINERD_ROOT" "$CONTAINERD_STATE" /var/lib/kubelet /run/containerd
for ns in /run/netns/cni-*; do
  [[ -e $ns ]] || continue
  umount "$ns" 2>/dev/null || umount -l "$ns" 2>/dev/null || true
  rm -f "$ns"
done

# 5. iptables: jumps into KUBE-*/CNI-* chains, then the chains themselves.
clean_iptables() {
  local ipt=$1 table rule chains c
  command -v "$ipt" >/dev/null 2>&1 || return 0
  for table in filter nat mangle raw; do
    "$ipt" -t "$table" -S >/dev/null 2>&1 || continue
    "$ipt" -t "$table" -S | { grep -E -- '^-A .* -[jg] (KUBE|CNI)-' || true; } |
      { grep -vE '^-A (KUBE|CNI)-' || true; } | while read -r rule; do
      eval "\"$ipt\" -t $table ${rule/#-A/-D}" 2>/dev/null || true
    done
    chains=$("$ipt" -t "$table" -S | sed -nE 's/^-N ((KUBE|CNI)-[^ ]*)$/\1/p')
    for c in $chains; do "$ipt" -t "$table" -F "$c" 2>/dev/null || true; done
    for c in $chains; do "$ipt" -t "$table" -X "$c" 2>/dev/null || log "warning: $ipt -t $table -X $c failed"; done
  done
}
clean_iptables iptables
clean_iptables ip6tables
# kube-router's ipsets (KUBE-SRC-*, KUBE-DST-*, kube-router-*), once no rule uses them; a set
# that existed before the first node-up.sh is left alone.
if command -v ipset >/dev/null 2>&1; then
  for set in $(ipset list -n 2>/dev/null | grep -E '^(inet6:)?(KUBE-|kube-router-)' || true); do
    grep -qxF -- "$set" "$NODE_STATE/ipsets.saved" 2>/dev/null && continue
    ipset destroy "$set" 2>/dev/null || log "warning: ipset destroy $set failed"
  done
  rm -f "$NODE_STATE/ipsets.saved"
fi

# 6. Kernel settings back to what they were before the node came up.
if [[ -f $NODE_STATE/sysctl.saved ]]; then
  while IFS='=' read -r k v; do
    [[ -n $k ]] || continue
    [[ $(sysctl -n "$k" 2>/dev/null) == "$v" ]] || sysctl -qw "$k=$v" 2>/dev/null || log "warning: could not restore $k=$v"
  done <"$NODE_STATE/sysctl.saved"
  rm -f "$NODE_STATE/sysctl.saved"
fi

# 7. Network devices and routes.
if ip link show "$REAL_NODE_BRIDGE" >/dev/null 2>&1; then
  for veth in $(ip -o link show master "$REAL_NODE_BRIDGE" 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1); do
    ip link del "$veth" 2>/dev/null || true
  done
  ip link del "$REAL_NODE_BRIDGE" 2>/dev/null || log "warning: could not delete bridge $REAL_NODE_BRIDGE"
fi
ip route del unreachable "$KWOK_POD_CIDR" 2>/dev/null || true
ip route del "$SERVICE_CIDR" dev "$REAL_NODE_IFACE" 2>/dev/null || true
ip link del "$REAL_NODE_IFACE" 2>/dev/null || true

# 8. cgroups the kubelet made (cgroup v1: one tree per controller), deepest first.
for root in /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/kubepods; do
  [[ -d $root ]] || continue
  find "$root" -depth -type d -exec rmdir {} + 2>/dev/null || true
  [[ -d $root ]] && log "warning: $root is still there (a process in it?)"
done
# Fixed host paths that did not exist before the first node-up.sh.
if [[ -f $NODE_STATE/created-paths ]]; then
  while read -r p; do
    [[ -n $p && -e $p ]] || continue
    umount_under "$p"
    rm -rf --one-file-system "$p" 2>/dev/null || log "warning: could not remove $p"
  done <"$NODE_STATE/created-paths"
fi
# /var/lib/kubelet/device-plugins is written even when the kubelet root is elsewhere.
rm -rf --one-file-system "$NODE_VAR" "$CONTAINERD_STATE" 2>/dev/null || log "warning: could not remove all of $NODE_VAR $CONTAINERD_STATE"
rm -rf "$NODE_STATE"
for c in "${NODE_COMPONENTS[@]}"; do rm -f "$PIDS_DIR/$c.pid"; done
log "real node down; host restored (see docs/real-node.md)"
