# The daemon's image: one image for every role (worker, beat, flower, migrate, emulator), chosen
# by the command. The default command is the worker.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first, from pyproject.toml alone, so that a code change does not reinstall them:
# a stub package lets pip resolve and install everything, then the stub is removed again.
COPY pyproject.toml ./
RUN mkdir worker && touch worker/__init__.py README.md \
    && pip install . \
    && pip uninstall --yes esms-callback-poller \
    && rm -rf worker build *.egg-info README.md

COPY alembic.ini ./
COPY migrations ./migrations
COPY worker ./worker
RUN touch README.md && pip install --no-deps . && rm -rf build *.egg-info

# Nothing in the image runs as root. /app stays root-owned and read-only to the daemon; beat
# keeps its schedule file in /tmp (see docker-compose.yml).
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin esms
USER esms

CMD ["celery", "-A", "worker", "worker", "--loglevel=INFO"]
