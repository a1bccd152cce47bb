#!/usr/bin/env bash
# Build container images with no docker daemon and no registry, as tars in
# target/images/, and import them into the real node's containerd when it
# runs (make image / make images).
#
#   hack/images/build.sh keelson      the release `keelson` binary + the shared
#                                     libraries ldd names + a non-root user
#   hack/images/build.sh pause        static C sandbox image (gcc -static)
#   hack/images/build.sh workloads    modelserver, notebook, trainer (Go, static)
#   hack/images/build.sh all          all of the above
#   hack/images/build.sh NAME...      any of: keelson pause modelserver notebook trainer
#
# Images are named keelson.dev/<name>:dev (IMAGE_TAG overrides dev); pods use
# them with imagePullPolicy: Never. IMPORT=0 skips the import.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../cluster/lib.sh"

IMAGES_SRC="$REPO_ROOT/hack/images"
OUT="$REPO_ROOT/target/images"
IMAGE_TAG=${IMAGE_TAG:-dev}
mkdir -p "$OUT/bin"

command -v python3 >/dev/null || die "python3 is required to write image tars"

image_name() { echo "keelson.dev/$1:$IMAGE_TAG"; }

build_pause() {
  command -v gcc >/dev/null || die "gcc is required for the pause image (Debian package: gcc)"
  gcc -static -Os -Wall -o "$OUT/bin/pause" "$IMAGES_SRC/pause/pause.c" ||
    die "gcc -static failed (Debian package libc6-dev provides the static libc)"
  python3 "$IMAGES_SRC/mkimage.py" --name "$(image_name pause)" --out "$OUT/pause.tar" \
    --file "$OUT/bin/pause=/pause" --entrypoint /pause --nonroot
}

build_go() {
  local name=$1
  command -v go >/dev/null || die "go is required for the $name image"
  (cd "$IMAGES_SRC" && CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS=-buildvcs=false \
    go build -trimpath -ldflags='-s -w' -o "$OUT/bin/$name" "./$name") || die "go build ./$name failed"
  local extra=()
  case $name in
    modelserver) extra=(--port 8080) ;;
    notebook) extra=(--port 8888 --env HOME=/home/jovyan --dir /home/jovyan=0755=65532) ;;
    trainer) extra=(--port 29500) ;;
  esac
  python3 "$IMAGES_SRC/mkimage.py" --name "$(image_name "$name")" --out "$OUT/$name.tar" \
    --file "$OUT/bin/$name=/usr/local/bin/$name" --entrypoint "/usr/local/bin/$name" --nonroot "${extra[@]}"
}

build_keelson() {
  local bin="$REPO_ROOT/target/release/keelson"
  log "cargo build --release --bin keelson"
  (cd "$REPO_ROOT" && "${CARGO:-cargo}" build --release --bin keelson) || die "cargo build --release failed"
  [[ -x $bin ]] || die "no $bin after cargo build"
  # Stripped, as the Dockerfile does; the CA bundle as distroless/cc has it.
  strip -o "$OUT/bin/keelson" "$bin" 2>/dev/null || cp -f "$bin" "$OUT/bin/keelson"
  local certs=()
  [[ -f /etc/ssl/certs/ca-certificates.crt ]] && certs=(--file /etc/ssl/certs/ca-certificates.crt=/etc/ssl/certs/ca-certificates.crt)
  python3 "$IMAGES_SRC/mkimage.py" --name "$(image_name keelson)" --out "$OUT/keelson.tar" \
    --file "$OUT/bin/keelson=/usr/local/bin/keelson" "${certs[@]}" --ldd --nonroot \
    --entrypoint /usr/local/bin/keelson --cmd run --port 8080
}

# Import into the real node's containerd when it is up.
import_images() {
  [[ ${IMPORT:-1} == 1 ]] || return 0
  if ! [[ -S $CONTAINERD_SOCK ]] || ! ctr --address "$CONTAINERD_SOCK" version >/dev/null 2>&1; then
    log "real node is not up (no containerd at $CONTAINERD_SOCK): images left in $OUT, not imported"
    return 0
  fi
  local n
  for n in "$@"; do
    ctr --address "$CONTAINERD_SOCK" -n k8s.io images import \
      "$OUT/$n.tar" >/dev/null || die "ctr images import $OUT/$n.tar failed"
    log "imported $(image_name "$n") into the real node"
  done
}

want=()
for a in "${@:-all}"; do
  case $a in
    all) want+=(pause modelserver notebook trainer keelson) ;;
    workloads) want+=(modelserver notebook trainer) ;;
    keelson | pause | modelserver | notebook | trainer) want+=("$a") ;;
    *) die "unknown image '$a' (want keelson, pause, modelserver, notebook, trainer, workloads or all)" ;;
  esac
done
for n in "${want[@]}"; do
  case $n in
    keelson) build_keelson ;;
    pause) build_pause ;;
    *) build_go "$n" ;;
  esac
done
import_images "${want[@]}"
