# syntax=docker/dockerfile:1
# Every wheel (the receiver's and its dependencies') is built in the first stage; the final image installs
# them with --no-index, so nothing is compiled or downloaded there, and keeps no build tools or wheels.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md CHANGELOG.md ./
COPY receiver ./receiver
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    RECEIVER_DATABASE_URL=sqlite:////data/receiver.db \
    RECEIVER_DATA_DIR=/data
RUN useradd --system --uid 10001 --user-group --home-dir /data --no-create-home receiver \
    && mkdir -p /data && chown receiver:receiver /data
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index /wheels/*.whl
USER receiver
WORKDIR /data
# The SQLite database, the generated secrets and the kept images (/data/assets).
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status != 200)"]
CMD ["receiver", "serve", "--host", "0.0.0.0", "--port", "8000"]
