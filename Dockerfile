# dispatcher: the runtime image. Slim Python, no compilers, no embedded PostgreSQL
# (the `embedded` extra stays out: production replicas always get DISPATCHER_DSN),
# runs as a non-root user, `dispatcher` as the entrypoint. No HEALTHCHECK: Kubernetes
# probes /healthz and /readyz (deploy/kubernetes).
#
#   docker build -t dispatcher:0.1.0 .
#
# Your executors are not in this image. Two ways to add them (docs/operations.md,
# "Build the image"):
#
# 1. Build your application image FROM this one; the working directory /app is on
#    sys.path when `dispatcher run` loads MODULE:APP:
#
#        FROM dispatcher:0.1.0
#        USER root
#        COPY requirements.txt /tmp/requirements.txt
#        RUN pip install --no-cache-dir -r /tmp/requirements.txt && rm /tmp/requirements.txt
#        COPY myapp/ /app/myapp/
#        USER 10001:10001
#        CMD ["run", "myapp.jobs:app"]
#
# 2. Install your application as a package into the same virtual environment with the
#    EXTRA_PACKAGES build argument (any pip requirement specifiers):
#
#        docker build --build-arg EXTRA_PACKAGES="myapp==1.4.2" -t myapp-dispatcher .

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: a virtual environment with dispatcher and its dependencies ---------------
FROM ${PYTHON_IMAGE} AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/dispatcher
ENV PATH=/opt/dispatcher/bin:$PATH

WORKDIR /src
COPY pyproject.toml README.md ./
COPY sql/ sql/
COPY dispatcher/ dispatcher/

# Extra requirement specifiers installed beside dispatcher (your application package).
ARG EXTRA_PACKAGES=""
# Every dependency ships manylinux wheels (asyncpg, psycopg[binary]): no compiler needed.
RUN pip install --no-cache-dir . ${EXTRA_PACKAGES}

# --- runtime: the virtual environment on a clean slim image ------------------------
FROM ${PYTHON_IMAGE} AS runtime

ENV PATH=/opt/dispatcher/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# A numeric user, so Kubernetes' runAsNonRoot can verify it without a runAsUser.
RUN groupadd --system --gid 10001 dispatcher \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /app --shell /usr/sbin/nologin dispatcher

COPY --from=build /opt/dispatcher /opt/dispatcher

WORKDIR /app
USER 10001:10001
EXPOSE 8080

ENTRYPOINT ["dispatcher"]
CMD ["--help"]
