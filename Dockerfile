# The taskrail image that docker-compose.yml runs: migrations, workers, beat, Flower, metrics.
# A deployment's own agents: build FROM this image, COPY the modules, set TASKRAIL_AGENTS.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TASKRAIL_DATA_DIR=/var/lib/taskrail

WORKDIR /app
COPY pyproject.toml README.md ./
COPY orchestration ./orchestration
COPY workers ./workers
COPY demo_agents ./demo_agents
RUN pip install . "flower>=2.0" \
    && useradd --system --uid 10001 --home-dir /app taskrail \
    && mkdir -p /var/lib/taskrail/metrics \
    && chown -R taskrail /var/lib/taskrail

USER taskrail
CMD ["celery", "-A", "workers", "worker", "--loglevel=INFO", "--pool=solo", "--queues=taskrail.hops,taskrail.control", "--hostname=worker@%h"]
