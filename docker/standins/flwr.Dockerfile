# Local stand-ins for Flower's official images flwr/superlink, flwr/supernode and
# flwr/superexec, for hosts that cannot reach an image registry (air-gapped hospitals, CI
# here). Built on a Debian base made with debootstrap (docker/build_images.sh); they mirror
# what the project relies on in Flower's images: a venv at /python/venv owned by user
# `app` (uid 49999) and first on PATH, WORKDIR and HOME /app, the same entrypoints.
#   docker build -f docker/standins/flwr.Dockerfile --target superlink \
#       --build-arg WHEELS_URL=http://172.17.0.1:18765/ -t flwr/superlink:1.42.0 docker/standins
ARG BASE_IMAGE=local/debian:bookworm-py
FROM ${BASE_IMAGE} AS base
ARG FLWR_VERSION=1.42.0
# A folder of wheels served over the Docker bridge (containers do not trust the host's
# package-index certificate). It stays this image's pip index, so the project's own
# Dockerfile (`pip install .`) builds on a stand-in exactly as on Flower's image.
ARG WHEELS_URL
RUN test -n "$WHEELS_URL" || { echo "build arg WHEELS_URL is required" >&2; exit 1; } \
    && host="$(echo "$WHEELS_URL" | sed -E 's#^[a-z]+://([^:/]+).*#\1#')" \
    && printf '[global]\nno-index = true\nfind-links = %s\ntrusted-host = %s\ndisable-pip-version-check = true\n' \
        "$WHEELS_URL" "$host" > /etc/pip.conf \
    && groupadd --gid 49999 app \
    && useradd --uid 49999 --gid 49999 --home-dir /app --create-home --shell /bin/sh app \
    && python3 -m venv /python/venv \
    && chown -R app:app /python /app
ENV PATH=/python/venv/bin:$PATH \
    HOME=/app \
    PYTHONUNBUFFERED=1
USER app
WORKDIR /app
RUN python -m pip install --no-cache-dir "flwr==${FLWR_VERSION}"
LABEL org.fedlsc.standin="flwr ${FLWR_VERSION} stand-in (docker/standins/flwr.Dockerfile)"

FROM base AS superlink
ENTRYPOINT ["flower-superlink"]

FROM base AS supernode
ENTRYPOINT ["flower-supernode"]

FROM base AS superexec
ENTRYPOINT ["flower-superexec"]
