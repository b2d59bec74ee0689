# One image for the three bangui-geo services; the command picks the service:
#   docker run bangui-geo python -m services.timer      (the default CMD runs the resolver)
# docker-compose.yml builds it once and sets `command:` per service.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# An unprivileged user owns nothing but /data, where persistence keeps the SQLite file.
RUN groupadd --system --gid 10001 bangui \
    && useradd --system --uid 10001 --gid bangui --no-create-home --home-dir /app \
        --shell /usr/sbin/nologin bangui \
    && mkdir /data \
    && chown bangui:bangui /data

WORKDIR /app

# The project and its runtime dependencies only (no test extra).
COPY pyproject.toml README.md ./
COPY bangui_geo/ bangui_geo/
COPY shared/ shared/
COPY services/ services/
# Behind a TLS-intercepting proxy pip needs that proxy's CA: pass a CA bundle as the build secret
# `build_ca` (docker-compose.yml: BUILD_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt). It is
# mounted for this step only and is not in the image; without it pip uses its own bundle.
RUN --mount=type=secret,id=build_ca \
    if [ -s /run/secrets/build_ca ]; then export PIP_CERT=/run/secrets/build_ca; fi \
    && pip install ".[postgres]" \
    && rm -rf build ./*.egg-info

# docker-compose.yml mounts a named volume on /data; a new volume takes this directory's owner.
ENV GEO_DB_PATH=/data/geo_cache.sqlite3
# /metrics and /health for Prometheus and the compose healthchecks.
ENV GEO_METRICS_PORT=9100 \
    GEO_METRICS_HOST=0.0.0.0
EXPOSE 9100

USER bangui:bangui

# Healthy while the service is connected to the broker (/health answers 200); the slim image has
# no curl, so Python asks. docker-compose.yml repeats it with the same command.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9100/health', timeout=3)"]

# Exec form: python is PID 1 and gets SIGTERM itself, for the graceful drain (GEO_DRAIN_TIMEOUT).
CMD ["python", "-m", "services.resolver"]
