# One image for every pumpwatch service; the command picks the service (see docker-compose.yml).
# It installs what uv.lock pins (hashes checked), the runtime only, not editable.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    UV_NO_CACHE=1 UV_PROJECT_ENVIRONMENT=/opt/pumpwatch PATH=/opt/pumpwatch/bin:$PATH
WORKDIR /app
COPY requirements/uv.txt requirements/uv.txt
RUN pip install --require-hashes -r requirements/uv.txt
COPY pyproject.toml uv.lock README.md ./
COPY services ./services
RUN uv sync --locked --no-editable && pip uninstall -y uv \
    && useradd --system --uid 10001 pumpwatch
USER pumpwatch

ENTRYPOINT ["pumpwatch"]
CMD ["--help"]
