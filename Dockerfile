# syntax=docker/dockerfile:1
# Build a wheel in one stage, install it into a clean slim image in the next.
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
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER receiver
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status != 200)"]
CMD ["receiver", "serve", "--host", "0.0.0.0", "--port", "8000"]
