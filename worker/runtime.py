"""Per-process resources: the settings, database engine, HTTP client and limiter, made once.

Worker threads share them (each is thread-safe). Built lazily so that importing the Celery app —
Flower, beat, `celery inspect` — opens no connection it does not need.
"""

from __future__ import annotations

from functools import lru_cache

import redis
from sqlalchemy import Engine

from worker.esms_client import EsmsClient
from worker.ratelimit import RateLimiter
from worker.settings import get_settings
from worker.store import make_engine


@lru_cache(maxsize=1)
def engine() -> Engine:
    return make_engine(get_settings())


@lru_cache(maxsize=1)
def esms_client() -> EsmsClient:
    settings = get_settings()
    return EsmsClient(
        settings.esms_base_url,
        settings.esms_timeout_seconds,
        max_connections=settings.worker_concurrency,
    )


@lru_cache(maxsize=1)
def rate_limiter() -> RateLimiter:
    settings = get_settings()
    client = redis.Redis.from_url(
        settings.redis_url.get_secret_value(),
        socket_timeout=5,
        socket_connect_timeout=5,
        health_check_interval=30,
    )
    return RateLimiter(client, settings.effective_rate_per_second)
