# One image for every pumpwatch service; the command picks the service (see docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY services ./services
RUN pip install . && useradd --system --uid 10001 pumpwatch
USER pumpwatch

ENTRYPOINT ["pumpwatch"]
CMD ["--help"]
