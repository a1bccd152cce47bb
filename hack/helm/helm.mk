# Helm targets; the top-level Makefile includes this file.
#   make helm-bin        build/cached helm (helm.sh/helm/v4 from its Go module) -> target/cluster/bin/helm
#   make helm-lint       helm lint charts/keelson
#   make helm-template   render the chart with its default values (CRDs included)
# The chart's crds/ are symlinks to the generated crds/, so `make crds` updates both.

HELM_HACK := $(CURDIR)/hack/helm
HELM := $(CURDIR)/target/cluster/bin/helm
CHART := $(CURDIR)/charts/keelson

.PHONY: helm-bin helm-lint helm-template

helm-bin:
	$(HELM_HACK)/build.sh >/dev/null

helm-lint: helm-bin
	$(HELM) lint $(CHART)

helm-template: helm-bin
	$(HELM) template keelson $(CHART) --namespace keelson-system --include-crds
