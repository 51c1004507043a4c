#!/usr/bin/env bash
# CI: the docker-compose demo end to end, plain and TLS (docker/demo.sh), on a machine
# with no image registry. Installs Debian's docker.io, docker-compose and debootstrap if
# missing, starts dockerd if none is running, and stops what it started, by PID, at the
# end. Fails if the images cannot be built, if the compose files are invalid, or if a
# demo run does not reach finished:completed with every check passed, or if it overruns
# its time budget (FEDLSC_CI_DOCKER_BUDGET seconds for all of it, default 3600). Measured
# on the heavily shared 2-core machine, images built cold: 2687 s (README, "Docker").
set -euo pipefail
cd "$(dirname "$0")/.."
budget="${FEDLSC_CI_DOCKER_BUDGET:-3600}"
start=$SECONDS
left() { echo $((budget - (SECONDS - start))); }

missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1 || missing+=(docker-compose)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "ci-docker: apt-get install ${missing[*]}"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

dockerd_pid=""
stop_dockerd() {
  if [ -n "$dockerd_pid" ] && kill -0 "$dockerd_pid" 2>/dev/null; then
    echo "ci-docker: stopping the dockerd this script started (pid $dockerd_pid)"
    kill -TERM "$dockerd_pid"
    for _ in $(seq 60); do kill -0 "$dockerd_pid" 2>/dev/null || break; sleep 1; done
    if kill -0 "$dockerd_pid" 2>/dev/null; then kill -KILL "$dockerd_pid"; fi
  fi
}
trap stop_dockerd EXIT
if ! docker info >/dev/null 2>&1; then
  log="${TMPDIR:-/tmp}/fedlsc-ci-dockerd.log"
  dockerd >"$log" 2>&1 &
  dockerd_pid=$!
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { echo "ci-docker: dockerd did not start:" >&2; tail -20 "$log" >&2; exit 1; }
  echo "ci-docker: started dockerd (pid $dockerd_pid, log $log)"
fi

if docker compose version >/dev/null 2>&1; then dc=(docker compose); else dc=(docker-compose); fi
for overlay in "" "-f docker/compose.tls.yml" "-f docker/compose.tls.yml -f docker/compose.gpu.yml"; do
  # shellcheck disable=SC2086
  "${dc[@]}" -f docker/compose.yml $overlay config -q
done
echo "ci-docker: compose files valid"
df -h / | tail -1 | awk '{print "ci-docker: disk before: " $4 " free of " $2}'

echo "ci-docker: building images (budget left $(left) s)"
timeout "$(left)" bash docker/build_images.sh
for mode in plain tls; do
  # The restart check (one more, resumed round) once, in the production-like TLS mode.
  flag="" extra=--no-restart-check; [ "$mode" = tls ] && flag=--tls extra=""
  echo "ci-docker: demo $mode (budget left $(left) s)"
  # shellcheck disable=SC2086
  timeout "$(left)" bash docker/demo.sh --no-build $flag $extra
done
df -h / | tail -1 | awk '{print "ci-docker: disk after: " $4 " free of " $2}'
docker system df
echo "ci-docker: plain and TLS demos finished:completed in $((SECONDS - start)) s"
