# Helm targets; the top-level Makefile includes this file.
#   make helm-bin        build/cached helm (helm.sh/helm/v4 from its Go module) -> target/cluster/bin/helm
#   make helm-lint       helm lint charts/keelson
#   make helm-crds       copy crds/ into charts/keelson/crds/ (tests/helm_chart.rs fails when they differ)
#   make helm-template   render the chart with its default values

HELM_HACK := $(CURDIR)/hack/helm
HELM := $(CURDIR)/target/cluster/bin/helm
CHART := $(CURDIR)/charts/keelson

.PHONY: helm-bin helm-lint helm-crds helm-template

helm-bin:
	$(HELM_HACK)/build.sh >/dev/null

helm-lint: helm-bin
	$(HELM) lint $(CHART)

helm-crds:
	cp $(CURDIR)/crds/*.yaml $(CHART)/crds/

helm-template: helm-bin
	$(HELM) template keelson $(CHART) --namespace keelson-system
