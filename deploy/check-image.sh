#!/usr/bin/env bash
# Build the deebert image from the Dockerfile and run it for real, without a Docker daemon or an image registry:
#   - the base image is a Debian root file system made by debootstrap (Python 3.11, as in python:3.11-slim),
#     imported once as localhost/deebert-base:bookworm;
#   - buildah builds the Dockerfile on it (vfs storage, chroot isolation: no daemon, no privileges needed);
#   - the image's own command (`deebert serve`) then runs inside the built image's file system, on loopback,
#     and the check asks it what a user would: readiness, a classification at two thresholds, /metrics, and
#     a graceful SIGTERM.
# Usage: bash deploy/check-image.sh            (as root; needs buildah, podman and debootstrap from apt)
# Env:   WORK (scratch, default /tmp/deebert-image), PORT (default 18000), KEEP=1 keeps the built image.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${WORK:-/tmp/deebert-image}
PORT=${PORT:-18000}
BASE=localhost/deebert-base:bookworm
IMAGE=localhost/deebert:check
STORE=(--storage-driver vfs)
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

say() { printf '\n== %s\n' "$*"; }
for tool in buildah podman debootstrap curl; do
    command -v "$tool" >/dev/null || { echo "check-image: $tool is missing (apt-get install -y buildah podman debootstrap curl)" >&2; exit 2; }
done
mkdir -p "$WORK"

if ! podman "${STORE[@]}" image exists "$BASE"; then
    say "base image: debootstrap bookworm (python3) -> $BASE"
    rm -rf "$WORK/rootfs"
    debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates,curl \
        bookworm "$WORK/rootfs" "$MIRROR" > "$WORK/debootstrap.log"
    # The base trusts what this machine trusts (a TLS-inspecting proxy's CA, where the machine sits behind one),
    # so that the build's pip reaches PyPI the way this machine's does.
    cp /etc/ssl/certs/ca-certificates.crt "$WORK/rootfs/etc/ssl/certs/ca-certificates.crt"
    tar -C "$WORK/rootfs" -c . | podman "${STORE[@]}" import --change 'CMD ["/bin/bash"]' - "$BASE" > /dev/null
fi

say "build: buildah bud --build-arg BASE_IMAGE=$BASE"
started=$(date +%s)
buildah "${STORE[@]}" bud --format docker --isolation chroot --layers=false --build-arg BASE_IMAGE="$BASE" -t "$IMAGE" "$ROOT"
echo "built $IMAGE in $(( $(date +%s) - started )) s"

say "run: the image's command in its own file system"
container=$(buildah "${STORE[@]}" from "$IMAGE")
mount=$(buildah "${STORE[@]}" mount "$container")
cleanup() {
    [ -n "${server:-}" ] && kill "$server" 2>/dev/null || true
    buildah "${STORE[@]}" umount "$container" > /dev/null 2>&1 || true
    buildah "${STORE[@]}" rm "$container" > /dev/null 2>&1 || true
    [ "${KEEP:-0}" = 1 ] || buildah "${STORE[@]}" rmi "$IMAGE" > /dev/null 2>&1 || true
}
trap cleanup EXIT
# The image's environment (DEEBERT_CHECKPOINT, DEEBERT_CACHE_DIR, HF_HUB_OFFLINE, ...) and its user and command.
mapfile -t envs < <(buildah "${STORE[@]}" inspect --format '{{range .OCIv1.Config.Env}}{{println .}}{{end}}' "$IMAGE" | sed '/^$/d')
user=$(buildah "${STORE[@]}" inspect --format '{{.OCIv1.Config.User}}' "$IMAGE")
for dir in proc dev sys; do mount --bind "/$dir" "$mount/$dir"; done
unmount_binds() { for dir in proc dev sys; do umount "$mount/$dir" 2>/dev/null || true; done; }
trap 'unmount_binds; cleanup' EXIT
env -i "${envs[@]}" DEEBERT_PORT="$PORT" chroot --userspec="$user" "$mount" \
    sh -c 'cd /app && exec deebert serve --host 127.0.0.1' > "$WORK/server.log" 2>&1 &
server=$!

for _ in $(seq 120); do
    curl -sf "http://127.0.0.1:$PORT/health/ready" > /dev/null && break
    kill -0 "$server" 2>/dev/null || { cat "$WORK/server.log"; echo "check-image: the server exited" >&2; exit 1; }
    sleep 1
done
curl -sf "http://127.0.0.1:$PORT/health/ready"; echo
for threshold in 0 balanced; do
    curl -sf "http://127.0.0.1:$PORT/v1/classify" -H 'content-type: application/json' \
        -H "X-Exit-Threshold: $threshold" -d '{"texts": ["a gripping, beautifully acted film", "a dull, lifeless mess"]}'
    echo
done
status=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT/v1/classify" -H 'content-type: application/json' -d '{"text": 5}')
[ "$status" = 422 ] || { echo "check-image: a bad body got $status, not 422" >&2; exit 1; }
curl -sf "http://127.0.0.1:$PORT/metrics" | grep -E '^deebert_(samples_total|runtime_info)' | head -3
kill -TERM "$server"
wait "$server" && code=0 || code=$?
echo "server exited $code after SIGTERM"
[ "$code" = 0 ] || { tail -20 "$WORK/server.log"; exit 1; }
say "image check passed"
