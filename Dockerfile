# mailqueue: one image for every role (migrate, worker, scheduler, web, devserver).
#   docker build -t mailqueue .
#   docker run --rm mailqueue mailqueue --help
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY mailqueue ./mailqueue
COPY migrations ./migrations
RUN pip install ".[postgres,web,dkim]" \
    && useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin mailqueue \
    && mkdir -p /var/lib/mailqueue && chown mailqueue /var/lib/mailqueue

USER mailqueue
EXPOSE 8025 9100 2525
CMD ["mailqueue", "--help"]
