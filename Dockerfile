# ibstream runtime image: the package and its dependencies only (no test extras), run as a non-root user.
FROM python:3.11-slim
WORKDIR /src
COPY pyproject.toml README.md ./
COPY ibstream ibstream
COPY storage storage
COPY recorder recorder
COPY flight_server flight_server
COPY clients clients
COPY simulator simulator
RUN python -m venv /opt/ibstream \
    && /opt/ibstream/bin/pip install --no-cache-dir . \
    && rm -rf /src \
    && useradd --create-home --uid 10001 ibstream \
    && mkdir /data && chown ibstream /data
WORKDIR /home/ibstream
USER ibstream
ENV PATH=/opt/ibstream/bin:$PATH \
    IBSTREAM_DATA_ROOT=/data
VOLUME /data
EXPOSE 8815
# Serving or recording: the Flight port accepts connections (the demo exits by itself and needs no check).
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD python -c "import os, socket; socket.create_connection(('127.0.0.1', int(os.environ.get('IBSTREAM_FLIGHT_PORT', '8815'))), 3)" || exit 1
# `docker run IMAGE` runs the demo. To serve or record, bind 0.0.0.0 inside the container with TLS and tokens
# (IBSTREAM_FLIGHT_HOST, IBSTREAM_TLS_CERT_FILE, IBSTREAM_TLS_KEY_FILE, IBSTREAM_TOKEN_FILE): see README "Docker".
CMD ["ibstream", "demo"]
