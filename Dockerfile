FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY laggard laggard
COPY collectors collectors
COPY agents agents
COPY rules rules
COPY commands commands
RUN pip install --no-cache-dir . && mkdir -p /var/lib/laggard && chown nobody /var/lib/laggard
USER nobody
