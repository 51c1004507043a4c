# The app's executor image (ServerApp or a hospital's ClientApp): Flower's official
# SuperExec image, pinned to the project's flwr version, plus the project and its
# dependencies. Where no registry is reachable, docker/build_images.sh builds local
# stand-ins under the same image names first; this file is the same for both.
ARG FLWR_VERSION=1.42.0
FROM flwr/superexec:${FLWR_VERSION}

WORKDIR /app
# Dependencies first, from pyproject.toml alone, so that a change of the code reuses this
# (multi-GB: torch) layer. flwr is already in the base image at the pinned version. The
# README (the package's long description) comes later: an edit of it must not rebuild this.
COPY --chown=app:app pyproject.toml ./
RUN python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; print('\n'.join(d for d in deps if not d.replace(' ', '').startswith('flwr')))" > /tmp/requirements.txt \
    && python -m pip install --no-cache-dir -r /tmp/requirements.txt
COPY --chown=app:app fedlsc_flwr ./fedlsc_flwr
COPY --chown=app:app fedlsc_common ./fedlsc_common
COPY --chown=app:app server_app ./server_app
COPY --chown=app:app client_app ./client_app
COPY --chown=app:app fedlsc_tools ./fedlsc_tools
COPY --chown=app:app conf ./conf
COPY --chown=app:app README.md ./
RUN python -m pip install --no-cache-dir --no-deps .

ENTRYPOINT ["flower-superexec"]
