# The scheduler-publisher container image. Build it with `scripts/build-image`, which builds the
# wheels on the host (no network needed inside the build) and passes them as the context:
#
#   scripts/build-image                                   # on a local Debian 12 base
#   BASE=python:3.11-slim-bookworm scripts/build-image    # on the official image
#
# Any base with Python >= 3.11 and `python3 -m venv` works (docs/install.md, "Container").
ARG BASE=python:3.11-slim-bookworm

# The virtual environment is built in a stage of its own: the wheels and pip's work files stay
# there, and only the environment itself is copied into the image. pip and setuptools go too:
# the service needs neither at run time (nothing imports pkg_resources).
FROM ${BASE} AS venv
COPY wheels/ /tmp/wheels/
RUN python3 -m venv /opt/scheduler-publisher \
 && /opt/scheduler-publisher/bin/pip install --no-cache-dir --no-index --find-links /tmp/wheels \
        scheduler-publisher \
 && /opt/scheduler-publisher/bin/python -m pip uninstall --yes --quiet setuptools pip

FROM ${BASE}
# A fixed numeric id (not a --system one: those are below 1000, and clash with the host's), so that `runAsNonRoot` (Kubernetes) can check it without /etc/passwd.
RUN useradd --user-group --uid 10001 --home-dir /var/lib/scheduler-publisher \
        --no-create-home --shell /usr/sbin/nologin scheduler-publisher \
 && install -d -m 0750 -o scheduler-publisher -g scheduler-publisher /var/lib/scheduler-publisher \
 && install -d -m 0755 /etc/scheduler-publisher
COPY --from=venv /opt/scheduler-publisher /opt/scheduler-publisher

# The image's own settings. The environment beats the options file
# (/etc/scheduler-publisher/scheduler-publisher.toml, read when it exists), so change these with
# `-e`, not in that file.
# - the entries file comes from the mounted folder (mount the folder, not the file: a live
#   edit or a ConfigMap update replaces the file, which a file mount would not follow);
# - HTTP on every interface of the container (`-p` decides what is reachable): any Host: header
#   is answered unless SCHEDULER_PUBLISHER_HTTP_ALLOWED_HOSTS lists the names;
# - JSON logs on stdout only (`podman logs`, `kubectl logs`): no log file;
# - the counters database in the volume.
ENV PATH=/opt/scheduler-publisher/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    SCHEDULER_PUBLISHER_CONFIG=/etc/scheduler-publisher/entries.json \
    SCHEDULER_PUBLISHER_HTTP_HOST=0.0.0.0 \
    SCHEDULER_PUBLISHER_LOG_FILE= \
    SCHEDULER_PUBLISHER_LOG_FORMAT=json \
    SCHEDULER_PUBLISHER_STATE_DB=/var/lib/scheduler-publisher/state.db

VOLUME ["/var/lib/scheduler-publisher"]
WORKDIR /var/lib/scheduler-publisher
USER 10001:10001
EXPOSE 8080

# urllib rather than curl: the image has Python and nothing else. Any answer but 200 fails.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('SCHEDULER_PUBLISHER_HTTP_PORT', '8080'), timeout=4)"]

# The service itself is PID 1: it handles SIGTERM (`podman stop`, `docker stop`, Kubernetes)
# by sending its offline announcements and exiting 0, so no init is needed.
ENTRYPOINT ["scheduler-publisher"]
CMD ["run"]
