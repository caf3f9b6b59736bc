# ibstream: the same install as `make`: a virtualenv with the package and its dependencies.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends make && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml Makefile README.md ./
COPY ibstream ibstream
COPY storage storage
COPY recorder recorder
COPY flight_server flight_server
COPY clients clients
COPY simulator simulator
RUN make install
COPY tests tests
COPY bench bench
ENV PATH=/app/.venv/bin:$PATH \
    IBSTREAM_DATA_ROOT=/data \
    IBSTREAM_FLIGHT_HOST=0.0.0.0
VOLUME /data
EXPOSE 8815
# `docker run IMAGE` runs the demo; `ibstream record` records from IBSTREAM_IB_HOST:IBSTREAM_IB_PORT into /data;
# `ibstream serve` serves /data; `make test` runs the tests.
CMD ["ibstream", "demo"]
