#!/usr/bin/env bash
# Build the images of the compose demo (docker/compose.yml):
#   flwr/superlink:1.42.0, flwr/supernode:1.42.0, flwr/superexec:1.42.0   (Flower's)
#   fedlsc-flwr-superexec:1.42.0         (the project on flwr/superexec: docker/superexec.Dockerfile)
#
# Where a registry is reachable, Flower's official images are pulled and used unchanged.
# Where not (air-gapped hospitals; CI here), local stand-ins of them are built under the
# same names from docker/standins/flwr.Dockerfile on a Debian base made with debootstrap,
# and every Python package comes from a wheel folder that this script fills on the host
# (pip wheel) and serves to the builds over the Docker bridge.
#
#   docker/build_images.sh            build what is missing; the project image is always
#                                     rebuilt (Docker's cache makes that quick when only
#                                     the code changed)
#   docker/build_images.sh --standins force stand-ins even where a registry is reachable
#   docker/build_images.sh --rebuild  rebuild the base and stand-ins too
#
# Needs: docker (DOCKER_BUILDKIT=0 works: no buildx needed), python3 with pip, and for the
# stand-ins debootstrap run as root. Prints "TIMING <step> <seconds>" lines.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
FLWR_VERSION="${FLWR_VERSION:-1.42.0}"
BASE_IMAGE="${FEDLSC_BASE_IMAGE:-local/debian:bookworm-py}"
PROJECT_IMAGE="${FEDLSC_IMAGE:-fedlsc-flwr-superexec:$FLWR_VERSION}"
# Wheels (about 3 GB: torch exists here only as the CUDA build), logs, the debootstrap root:
# a machine-wide cache like pip's, so a fresh clone does not download it all again.
BUILD_DIR="${FEDLSC_DOCKER_BUILD_DIR:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/fedlsc-flwr-docker}"
WHEEL_PORT="${FEDLSC_WHEEL_PORT:-18765}"
export DOCKER_BUILDKIT=0  # the legacy builder: Debian's docker.io has no buildx

force_standins=0 rebuild=0
for arg in "$@"; do
  case "$arg" in
    --standins) force_standins=1 ;;
    --rebuild) rebuild=1 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "build_images.sh: unknown option $arg (see --help)" >&2; exit 2 ;;
  esac
done

log() { echo "build_images: $*"; }
have_image() { docker image inspect "$1" >/dev/null 2>&1; }
is_standin() {
  [ -n "$(docker image inspect -f '{{index .Config.Labels "org.fedlsc.standin"}}' "$1" 2>/dev/null)" ]
}
timed() {  # timed NAME command...: run it, print "TIMING NAME seconds"
  local name="$1" start=$SECONDS; shift
  "$@"
  echo "TIMING $name $((SECONDS - start))"
}
docker_build() {  # docker_build LOGNAME args...: full output in $BUILD_DIR/LOGNAME.log
  # --force-rm: a failed step leaves no container (and the image under it) behind.
  if ! docker build --force-rm "${@:2}" >"$BUILD_DIR/$1.log" 2>&1; then
    echo "build_images: docker build failed; the end of $BUILD_DIR/$1.log:" >&2
    tail -30 "$BUILD_DIR/$1.log" >&2
    return 1
  fi
}

server_pid=""
cleanup() {
  if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
  if [ -d "$BUILD_DIR/rootfs" ]; then rm -rf "$BUILD_DIR/rootfs"; fi
}
trap cleanup EXIT
trap 'exit 143' TERM INT  # so that cleanup runs when CI's timeout stops this script

# ------------------------------------------------------------------ wheels
requirements() {  # flwr, the project's dependencies (without flwr[simulation]), the build backend
  python3 - "$root/pyproject.toml" "$FLWR_VERSION" <<'PY'
import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))
deps = [d for d in project["project"]["dependencies"] if not d.replace(" ", "").startswith("flwr")]
backend = project["build-system"]["requires"]
print("\n".join(["pip", "setuptools", "wheel", f"flwr=={sys.argv[2]}", *backend, *deps]))
PY
}

fill_wheels() {
  mkdir -p "$BUILD_DIR/wheels"
  requirements > "$BUILD_DIR/requirements.txt"
  local stamp="$BUILD_DIR/wheels/.requirements"
  if cmp -s "$BUILD_DIR/requirements.txt" "$stamp"; then
    log "wheels for these requirements already in $BUILD_DIR/wheels"
    return
  fi
  local wheels="$BUILD_DIR/wheels"
  # First from the folder alone (a changed requirement list often needs nothing new).
  if python3 -m pip wheel --quiet --disable-pip-version-check --no-index --find-links "$wheels" \
      --wheel-dir "$wheels" -r "$BUILD_DIR/requirements.txt" >/dev/null 2>&1; then
    log "every wheel was already in $wheels"
  else
    log "collecting wheels into $wheels ($(tr '\n' ' ' < "$BUILD_DIR/requirements.txt"))"
    # pip wheel: downloads wheels as they are and builds the few sdist-only packages, so
    # the images need neither a compiler nor any network beyond this folder.
    if ! python3 -m pip wheel --quiet --disable-pip-version-check --wheel-dir "$wheels" \
        -r "$BUILD_DIR/requirements.txt" 2>&1 | { grep -v "is ignored: it is neither a file" || true; }
    then
      echo "build_images: pip wheel failed" >&2; exit 1
    fi
  fi
  cp "$BUILD_DIR/requirements.txt" "$stamp"
}

serve_wheels() {  # serve the wheel folder on the Docker bridge; sets WHEELS_URL
  local bridge="${FEDLSC_WHEEL_HOST:-}"  # the host's address on Docker's default bridge
  [ -n "$bridge" ] || bridge="$(docker network inspect bridge -f '{{range .IPAM.Config}}{{.Gateway}}{{end}}')"
  [ -n "$bridge" ] || bridge="$(ip -4 -o addr show docker0 2>/dev/null | awk '{print $4}' | cut -d/ -f1)"
  [ -n "$bridge" ] || bridge=172.17.0.1
  python3 -m http.server "$WHEEL_PORT" --bind "$bridge" --directory "$BUILD_DIR/wheels" \
    >"$BUILD_DIR/wheel-server.log" 2>&1 &
  server_pid=$!
  WHEELS_URL="http://$bridge:$WHEEL_PORT/"
  for _ in $(seq 50); do
    if python3 -c "import urllib.request; urllib.request.urlopen('$WHEELS_URL', timeout=2)" 2>/dev/null; then
      log "wheels served at $WHEELS_URL (pid $server_pid)"
      return
    fi
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.2
  done
  echo "build_images: the wheel server did not start on $WHEELS_URL:" >&2
  cat "$BUILD_DIR/wheel-server.log" >&2
  exit 1
}

# ------------------------------------------------------------------ images
build_base() {
  if ! command -v debootstrap >/dev/null; then
    echo "build_images: debootstrap is missing (apt-get install debootstrap)" >&2; exit 1
  fi
  if [ "$(id -u)" != 0 ]; then
    echo "build_images: debootstrap must run as root (sudo $0)" >&2; exit 1
  fi
  rm -rf "$BUILD_DIR/rootfs"
  # ${DEBIAN_MIRROR:-} empty: debootstrap's default Debian mirror.
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$BUILD_DIR/rootfs" ${DEBIAN_MIRROR:-} >"$BUILD_DIR/debootstrap.log" 2>&1 || {
      tail -20 "$BUILD_DIR/debootstrap.log" >&2; exit 1; }
  rm -rf "$BUILD_DIR"/rootfs/var/cache/apt/archives/*.deb "$BUILD_DIR"/rootfs/var/lib/apt/lists/*
  tar -C "$BUILD_DIR/rootfs" -c . | docker import - "$BASE_IMAGE" >/dev/null
  rm -rf "$BUILD_DIR/rootfs"
}

build_standin() {  # build_standin superlink|supernode|superexec
  docker_build "standin-$1" -f "$here/standins/flwr.Dockerfile" --target "$1" \
    --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "FLWR_VERSION=$FLWR_VERSION" \
    --build-arg "WHEELS_URL=$WHEELS_URL" -t "flwr/$1:$FLWR_VERSION" "$here/standins"
}

registry_reachable() {
  timeout 120 docker pull --quiet "flwr/superexec:$FLWR_VERSION" >/dev/null 2>&1
}

mkdir -p "$BUILD_DIR"
flower_images=(superlink supernode superexec)
missing=()
for name in "${flower_images[@]}"; do
  if [ "$rebuild" = 1 ] && is_standin "flwr/$name:$FLWR_VERSION"; then missing+=("$name")
  elif ! have_image "flwr/$name:$FLWR_VERSION"; then missing+=("$name"); fi
done

use_standins=0
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$force_standins" = 0 ] && [ "$rebuild" = 0 ] && registry_reachable; then
    log "registry reachable: using Flower's official images"
    for name in "${missing[@]}"; do timed "pull-$name" docker pull --quiet "flwr/$name:$FLWR_VERSION"; done
    missing=()
  else
    use_standins=1
    log "no registry (or --standins): building local stand-ins of flwr/{${missing[*]}}:$FLWR_VERSION"
  fi
fi
if is_standin "flwr/superexec:$FLWR_VERSION"; then use_standins=1; fi

if [ "$use_standins" = 1 ]; then
  timed wheels fill_wheels
  serve_wheels
fi
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$rebuild" = 1 ] || ! have_image "$BASE_IMAGE"; then
    log "debootstrap of a Debian bookworm base -> $BASE_IMAGE"
    timed base build_base
  fi
  for name in "${missing[@]}"; do
    log "stand-in flwr/$name:$FLWR_VERSION"
    timed "standin-$name" build_standin "$name"
  done
fi

image_id() { docker image inspect -f '{{.Id}}' "$1" 2>/dev/null || true; }
free_gib() {  # free GiB on the filesystem of Docker's data root
  local dir; dir="$(docker info -f '{{.DockerRootDir}}' 2>/dev/null || echo /var/lib/docker)"
  df -P -BG "$dir" 2>/dev/null | awk 'NR == 2 {sub("G", "", $4); print $4}'
}
free="$(free_gib)"
if [ -n "$free" ] && [ "$free" -lt "${FEDLSC_DOCKER_MIN_FREE_GIB:-8}" ]; then
  # A change of pyproject.toml rebuilds the dependency layer: about 6 GB (torch).
  log "warning: only ${free} GiB free for Docker; rebuilding the dependency layer takes about 6" \
    "(docker image prune removes untagged images)"
fi
old_project="$(image_id "$PROJECT_IMAGE")"
log "project image $PROJECT_IMAGE (docker/superexec.Dockerfile on flwr/superexec:$FLWR_VERSION)"
timed project docker_build project -f "$here/superexec.Dockerfile" \
  --build-arg "FLWR_VERSION=$FLWR_VERSION" -t "$PROJECT_IMAGE" "$root"
new_project="$(image_id "$PROJECT_IMAGE")"
if [ -n "$old_project" ] && [ "$old_project" != "$new_project" ] \
    && [ "$(docker image inspect -f '{{len .RepoTags}}' "$old_project" 2>/dev/null)" = 0 ]; then
  # The image this build replaced is untagged now: remove it (and its layers no other image
  # uses), or every rebuild after a dependency change keeps another 6 GB. One a container
  # still uses stays.
  if docker rmi "$old_project" >/dev/null 2>&1; then
    log "removed the replaced project image ${old_project#sha256:}"
  fi
fi

docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' \
  | grep -E "^(flwr/(superlink|supernode|superexec):$FLWR_VERSION|$PROJECT_IMAGE|$BASE_IMAGE) " \
  | sed 's/^/IMAGE /'
