# Local control plane targets; the top-level Makefile includes this file.
#   make cluster-bins   build/cached etcd, kube-*, kubectl, kwok -> target/cluster/bin
#   make cluster        start the cluster (idempotent) -> target/cluster/kubeconfig
#   make cluster-down   stop it and remove its data (logs are kept)
#   make cluster-pv NAME=data SIZE=10Gi   create a hostPath PersistentVolume
#   make cluster-smoke  check the running cluster (nodes, pods, GPUs, exits, GC, PVCs)
#   (real node targets: see the end of this file)

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

# Real node (docs/real-node.md): `REAL_NODE=1 make cluster` adds it (opt-in;
# on in CI, where .ci/run sets REAL_NODE=1); `make cluster-down` takes it down and restores the host.
#   make cluster-smoke-real  check it with real containers and traffic
#   make image               release `keelson` binary -> target/images/keelson.tar (+ import)
#   make images              pause + stand-in workload images (+ import)
#   make image-docker        the Dockerfile, for machines with a Docker engine
.PHONY: cluster-smoke-real image images image-docker

cluster-smoke-real:
	$(CLUSTER_HACK)/node-smoke.sh

image:
	$(CURDIR)/hack/images/build.sh keelson

images:
	$(CURDIR)/hack/images/build.sh pause workloads

image-docker:
	docker build -t keelson:dev .
