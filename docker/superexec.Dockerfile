# The app's executor image (ServerApp or a hospital's ClientApp): Flower's official
# SuperExec image, pinned to the project's flwr version, plus the project's dependencies.
ARG FLWR_VERSION=1.42.0
FROM flwr/superexec:${FLWR_VERSION}

WORKDIR /app
COPY --chown=app:app pyproject.toml README.md ./
COPY --chown=app:app fedlsc_flwr ./fedlsc_flwr
COPY --chown=app:app fedlsc_common ./fedlsc_common
COPY --chown=app:app server_app ./server_app
COPY --chown=app:app client_app ./client_app
COPY --chown=app:app fedlsc_tools ./fedlsc_tools
COPY --chown=app:app conf ./conf
# flwr is already in the base image at the pinned version: install everything else.
RUN sed -i 's/^\s*"flwr\[simulation\]==[^"]*",//' pyproject.toml \
    && python -m pip install --no-cache-dir .

ENTRYPOINT ["flower-superexec"]
