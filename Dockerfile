# One image for every role of the platform on ECS: `webserver`, `daemon`, `worker`, `autoscaler`
# (the entry point's first argument; docker/entrypoint.sh). Build (nothing here runs Docker):
#   docker build -t dagster-taskiq:$(git rev-parse --short HEAD) .
# or scripts/build-and-push.sh, which also tags it with the git SHA and pushes it to ECR.
ARG PYTHON_IMAGE=python:3.13-slim-bookworm

# Build stage: the locked dependencies (hash-checked, requirements.runtime.lock: no dev or bench
# tools) and this project, into a virtual environment the final stage copies whole.
FROM ${PYTHON_IMAGE} AS build
ENV UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_PYTHON_DOWNLOADS=never PIP_NO_CACHE_DIR=1
RUN pip install --no-cache-dir uv==0.13.9
WORKDIR /src
COPY requirements.runtime.lock ./
RUN uv venv /opt/venv \
    && UV_PYTHON=/opt/venv/bin/python uv pip sync --require-hashes requirements.runtime.lock
COPY pyproject.toml README.md ./
COPY src ./src
RUN UV_PYTHON=/opt/venv/bin/python uv pip install --no-deps .

# Final stage: the same slim Python, no build tools, no uv; a non-root user; the journal on a
# path the worker's task definition mounts from EFS (DESIGN.md: outcomes outlive the task).
FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 dagster \
    && useradd --system --uid 10001 --gid dagster --create-home --home-dir /home/dagster dagster \
    && mkdir -p /var/lib/dagster-taskiq/journal /opt/dagster/home \
    && chown -R dagster:dagster /var/lib/dagster-taskiq /opt/dagster
COPY --from=build /opt/venv /opt/venv
COPY docker/dagster.yaml /opt/dagster/home/dagster.yaml
COPY docker/workspace.yaml /opt/dagster/workspace.yaml
COPY --chmod=0755 docker/entrypoint.sh /usr/local/bin/entrypoint
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    DAGSTER_HOME=/opt/dagster/home \
    DAGSTER_TASKIQ_JOURNAL_DIR=/var/lib/dagster-taskiq/journal \
    DAGSTER_TASKIQ_PRELOAD=dagster_taskiq_demo.definitions \
    DAGSTER_TASKIQ_METRICS_PORT=9090 \
    DAGSTER_TASKIQ_LOG_FORMAT=json
USER 10001:10001
WORKDIR /home/dagster
EXPOSE 3000 9090
ENTRYPOINT ["entrypoint"]
CMD ["worker"]
