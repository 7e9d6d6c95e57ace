#!/usr/bin/env bash
# Real containers on a machine without a Docker engine (SPEC §12): Debian's podman + runc speak the Docker API, so the
# docker CLI, docker-py and Airflow's DockerOperator run real containers against `podman system service`.
#
#   bash scripts/containers.sh            # everything below, in order; prints the DOCKER_HOST to use
#   bash scripts/containers.sh install    # apt-get podman, runc, debootstrap; /etc/containers/containers.conf
#   bash scripts/containers.sh base       # debootstrap bookworm (minbase) -> localhost/debian-base:bookworm
#   bash scripts/containers.sh build      # the CPU image from docker/Dockerfile.cpu (cached layers on re-runs)
#   bash scripts/containers.sh start      # podman system service on $SARMERGE_PODMAN_SOCK, by PID
#   bash scripts/containers.sh stop       # stop that service (by the PID it recorded)
#   bash scripts/containers.sh status     # what is in place
#
# Every step is idempotent. Needs root (rootful podman; apt-get). No image registry is reachable here: the base image
# is built locally, and image builds reach the package registries with `--network host`.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
STATE=${SARMERGE_PODMAN_STATE:-/run/sarmerge-podman}
SOCK=${SARMERGE_PODMAN_SOCK:-$STATE/podman.sock}
PIDFILE=$STATE/service.pid
BASE_IMAGE=${SARMERGE_BASE_IMAGE:-localhost/debian-base:bookworm}
CPU_IMAGE=${SARMERGE_CPU_IMAGE:-localhost/sarmerge-cpu:latest}
TORCH_WHEEL=${SARMERGE_TORCH_WHEEL:-/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl}
MIRROR=${SARMERGE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
CONF=/etc/containers/containers.conf
MARK="# written by sarmerge scripts/containers.sh"

log() { printf 'containers: %s\n' "$*" >&2; }
die() { printf 'containers: error: %s\n' "$*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root (rootful podman and apt-get); you are $(id -un)"

install_podman() {
  local missing=()
  for cmd in podman runc debootstrap; do command -v "$cmd" >/dev/null || missing+=("$cmd"); done
  if [ ${#missing[@]} -gt 0 ]; then
    log "apt-get install podman runc debootstrap (missing: ${missing[*]}) ..."
    # crun fails on this kernel's hybrid cgroups; recommends (buildah, slirp4netns, fuse-overlayfs) are not needed
    # rootful on ext4 (native overlay) with host networking
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends podman runc debootstrap >/dev/null
  fi
  local want
  want=$(cat <<EOF
$MARK (SPEC §12: runc, not crun; cgroupfs; ulimits)
[containers]
default_ulimits = ["nofile=10000:10000", "nproc=4096:4096"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
)
  if [ "$(cat "$CONF" 2>/dev/null)" != "$want" ]; then
    mkdir -p "$(dirname "$CONF")"
    if [ -s "$CONF" ] && ! grep -qF "$MARK" "$CONF" && [ ! -e "$CONF.orig" ]; then
      cp -p "$CONF" "$CONF.orig"
      log "kept the previous $CONF as $CONF.orig"
    fi
    printf '%s\n' "$want" >"$CONF.tmp.$$" && mv "$CONF.tmp.$$" "$CONF"
    log "wrote $CONF"
  fi
  podman info --format '{{.Host.OCIRuntime.Name}} {{.Store.GraphDriverName}}' >/dev/null \
    || die "podman info failed: see the message above"
}

image_exists() { podman image exists "$1"; }

build_base() {
  if image_exists "$BASE_IMAGE"; then
    log "$BASE_IMAGE present"
    return
  fi
  local dir
  dir=$(mktemp -d /var/tmp/sarmerge-debootstrap.XXXXXX)
  trap 'rm -rf "$dir"' RETURN
  log "debootstrap --variant=minbase bookworm (~1 min) ..."
  debootstrap --variant=minbase bookworm "$dir" "$MIRROR" >"$dir.log" 2>&1 \
    || { tail -20 "$dir.log" >&2; rm -f "$dir.log"; die "debootstrap failed (mirror $MIRROR)"; }
  rm -f "$dir.log"
  # apt inside image builds: no recommends, no docs, clean lists (a slim base like debian:bookworm-slim)
  rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/*
  tar -C "$dir" -c . | podman import --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
  log "imported $BASE_IMAGE"
}

# Digest of what the image copies from the working tree (tests refuse a stale image; tests/test_containers_real.py
# computes the same): sha256sum lines of the files in C order, hashed.
source_digest() {
  (cd "$REPO" && { find sarmerge tasks -type f ! -path '*/__pycache__/*' ! -name '*.pyc';
    printf '%s\n' pyproject.toml constraints.txt params.yaml dvc.yaml docker/sarmerge-step docker/Dockerfile.cpu; } \
    | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-64)
}

build_cpu() {
  image_exists "$BASE_IMAGE" || die "$BASE_IMAGE is missing: run \`bash scripts/containers.sh base\` first"
  # The CPU torch wheel is local only (PyPI's torch 2.13.0 is the CUDA build, several GB): hand it to the build
  # through docker/wheels/, which git ignores.
  mkdir -p "$REPO/docker/wheels"
  if [ -f "$TORCH_WHEEL" ]; then
    local dest
    dest="$REPO/docker/wheels/$(basename "$TORCH_WHEEL")"
    cmp -s "$TORCH_WHEEL" "$dest" 2>/dev/null || cp "$TORCH_WHEEL" "$dest"
  fi
  # A TLS-intercepting proxy between this machine and the registries: its CAs reach the build's pip steps (only)
  mkdir -p "$REPO/docker/certs"
  for crt in /usr/local/share/ca-certificates/*.crt; do
    [ -f "$crt" ] && { cmp -s "$crt" "$REPO/docker/certs/$(basename "$crt")" || cp "$crt" "$REPO/docker/certs/"; }
  done
  log "podman build $CPU_IMAGE from docker/Dockerfile.cpu (cached layers make re-runs fast) ..."
  # docker format: OCI images drop SHELL (the Dockerfiles use bash with pipefail)
  podman build --format docker --network host -f "$REPO/docker/Dockerfile.cpu" --build-arg "BASE_IMAGE=$BASE_IMAGE" \
    --build-arg "SOURCE_DIGEST=$(source_digest)" -t "$CPU_IMAGE" "$REPO" >&2
  podman image prune -f >/dev/null  # dangling layers of earlier builds
  log "built $CPU_IMAGE"
}

service_pid() {
  local pid
  pid=$(cat "$PIDFILE" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ -d "/proc/$pid" ] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q "system service" \
    && echo "$pid"
}

start_service() {
  mkdir -p "$STATE"
  if pid=$(service_pid); then
    log "podman system service already running (PID $pid)"
  else
    rm -f "$SOCK"
    # --time 0: never exit on idle; setsid: its own session, so stopping it never touches the caller's group
    setsid podman system service --time 0 "unix://$SOCK" >"$STATE/service.log" 2>&1 </dev/null &
    echo $! >"$PIDFILE"
    for _ in $(seq 100); do [ -S "$SOCK" ] && break; sleep 0.1; done
    [ -S "$SOCK" ] || { tail -20 "$STATE/service.log" >&2; die "podman system service did not open $SOCK"; }
    log "podman system service started (PID $(cat "$PIDFILE"), log $STATE/service.log)"
  fi
  DOCKER_HOST="unix://$SOCK" docker version --format 'Docker API {{.Server.APIVersion}} (podman {{.Server.Version}})' \
    >&2 || die "the docker CLI cannot talk to $SOCK"
  echo "export DOCKER_HOST=unix://$SOCK"
}

stop_service() {
  if pid=$(service_pid); then
    kill "$pid"
    for _ in $(seq 50); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
    [ -d "/proc/$pid" ] && kill -9 "$pid"
    log "stopped podman system service (PID $pid)"
  else
    log "no podman system service of ours is running"
  fi
  rm -f "$PIDFILE" "$SOCK"
}

status() {
  command -v podman >/dev/null && podman --version || echo "podman: not installed"
  for img in "$BASE_IMAGE" "$CPU_IMAGE"; do
    if command -v podman >/dev/null && image_exists "$img"; then echo "image $img: present"; else echo "image $img: missing"; fi
  done
  if command -v podman >/dev/null && image_exists "$CPU_IMAGE"; then
    built=$(podman image inspect --format '{{ index .Labels "sarmerge.source" }}' "$CPU_IMAGE")
    if [ "$built" = "$(source_digest)" ]; then echo "image $CPU_IMAGE: up to date with the working tree"
    else echo "image $CPU_IMAGE: stale (sources changed since it was built): run \`bash scripts/containers.sh build\`"; fi
  fi
  if pid=$(service_pid); then echo "service: PID $pid on unix://$SOCK"; else echo "service: not running"; fi
}

case "${1:-all}" in
  install) install_podman ;;
  base) install_podman; build_base ;;
  build) install_podman; build_base; build_cpu ;;
  start) start_service ;;
  stop) stop_service ;;
  status) status ;;
  all) install_podman; build_base; build_cpu; start_service ;;
  *) die "unknown command ${1}: install | base | build | start | stop | status | all" ;;
esac
