// Stand-in workload images for the real node (hack/images/build.sh).
// Standard library only: they build offline, CGO_ENABLED=0, static.
module keelson.dev/hack/images

go 1.22
