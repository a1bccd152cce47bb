# Local control plane targets; the top-level Makefile includes this file.
#   make cluster-bins   build/cached etcd, kube-*, kubectl, kwok -> target/cluster/bin
#   make cluster        start the cluster (idempotent) -> target/cluster/kubeconfig
#   make cluster-down   stop it and remove its data (logs are kept)
#   make cluster-pv NAME=data SIZE=10Gi   create a hostPath PersistentVolume
#   make cluster-smoke  check the running cluster (nodes, pods, GPUs, exits, GC, PVCs)

CLUSTER_HACK := $(CURDIR)/hack/cluster

.PHONY: cluster-bins cluster cluster-down cluster-pv cluster-smoke

cluster-bins:
	$(CLUSTER_HACK)/build.sh

cluster:
	$(CLUSTER_HACK)/up.sh

cluster-down:
	$(CLUSTER_HACK)/down.sh

cluster-pv:
	$(CLUSTER_HACK)/pv.sh $(NAME) $(SIZE)

cluster-smoke:
	$(CLUSTER_HACK)/smoke.sh
