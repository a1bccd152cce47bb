# Keelson: `make demo` runs the operator on the embedded local cluster; `make test` runs every test.
SHELL := /bin/bash
CARGO ?= cargo
KUBECTL := $(CURDIR)/target/cluster/bin/kubectl --kubeconfig $(CURDIR)/target/cluster/kubeconfig

.PHONY: all build test test-real test-idempotence unit integration crds lint fmt demo demo-down bench bench-router bench-scale bench-idle bench-plot image clean-demo

all: build

build:
	$(CARGO) build --bins

## crds: regenerate crds/ from the Rust types (a unit test fails when they differ)
crds:
	$(CARGO) run -q -- crds --out crds

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt

## test: lint, unit tests, then the integration tests against the local cluster (started if needed);
## with REAL_NODE=1 also `test-real`
test: lint cluster
	$(CARGO) test --workspace --no-fail-fast --lib --bins --test crds_offline --test proptests --test docs_paths --test helm_chart --test crash --test disruptions --test faults --test idempotence --test write_budget --test apf --test integration --test random_specs --test rbac_audit --test router_adversarial --test router_e2e --test router_grpc -- --test-threads=$${TEST_THREADS:-4}
	if [[ $${REAL_NODE:-0} == 1 ]]; then $(MAKE) test-real; fi

## test-real: the end-to-end suite on the real node (docs/real-node.md): the cluster with its node,
## the images, then workloads that really run and the operator installed as a pod
test-real:
	REAL_NODE=1 $(CLUSTER_HACK)/up.sh
	$(CURDIR)/hack/images/build.sh pause workloads keelson
	$(CLUSTER_HACK)/node-smoke.sh
	$(CARGO) test --no-fail-fast --test real_node --test operator_pod -- --test-threads=1 --nocapture

## test-idempotence: a forced resync of settled resources makes zero writes, read from the API
## server's counters (also part of `make test`, where cargo runs it before the other cluster tests).
test-idempotence: cluster
	$(CARGO) test --test idempotence

unit:
	$(CARGO) test --workspace --lib --test crds_offline --test proptests --test docs_paths

integration: cluster
	$(CARGO) test --test '*'

## demo: the cluster, the CRDs, the operator as a local process, and every example applied
demo:
	hack/demo.sh up

demo-down:
	hack/demo.sh down

## bench: every benchmark; each prints a table and asserts nothing; then the charts (bench-plot)
bench: bench-router bench-scale bench-idle
	$(MAKE) bench-plot

## bench-plot: SVG charts in target/bench/ of the figures the last bench-router and bench-scale wrote
## there (router.tsv, scale.tsv)
bench-plot:
	$(CARGO) run -q -p keelson-bench-plot -- target/bench

## bench-router: direct vs `keelson router` vs nginx split_clients vs HAProxy on 127.0.0.1 (GET, a 1 MiB
## POST, h2c), and instructions per request under callgrind (needs wrk, h2load, nginx, haproxy and
## valgrind; installed from Debian when missing)
bench-router:
	hack/bench/router.sh

## bench-idle: resident memory of an idle `keelson run` (release build), anonymous and file-backed
bench-idle: cluster
	hack/bench/idle.sh

## bench-scale: N TrainingJobs of 4 GPU workers at once on the local cluster (N=100 and 1,000;
## BENCH_FULL=1 adds 5,000), against the Kubeflow training-operator built from its Go module and
## against the bench creating the same children itself (the raw row)
bench-scale: cluster
	hack/bench/anchor.sh build
	$(CARGO) bench --bench scale

include hack/cluster/cluster.mk

# The router's fuzzing (`make fuzz`).
include hack/router/router.mk

# Helm (charts/keelson): helm built from its Go module, lint and template checks.
-include hack/helm/helm.mk
