"""Per-process resources: the settings, database engine, HTTP client and limiter, made once.

Each worker process runs one task at a time, so it needs only a couple of connections. Built
lazily, in the process that uses them: after the prefork pool has forked, and never in Flower,
beat or `celery inspect`, which import the app but poll nothing.
"""

from __future__ import annotations

from functools import lru_cache

import redis
from sqlalchemy import Engine

from worker.cooloff import CoolOffs
from worker.esms_client import EsmsClient
from worker.ratelimit import RateLimiter
from worker.settings import get_settings
from worker.store import make_engine

_CONNECTIONS_PER_PROCESS = 2


@lru_cache(maxsize=1)
def engine() -> Engine:
    return make_engine(get_settings(), pool_size=_CONNECTIONS_PER_PROCESS)


@lru_cache(maxsize=1)
def esms_client() -> EsmsClient:
    settings = get_settings()
    return EsmsClient(
        settings.esms_base_url,
        settings.esms_timeout_seconds,
        max_connections=_CONNECTIONS_PER_PROCESS,
    )


@lru_cache(maxsize=1)
def redis_client() -> redis.Redis:
    return redis.Redis.from_url(
        get_settings().redis_url.get_secret_value(),
        socket_timeout=5,
        socket_connect_timeout=5,
        health_check_interval=30,
    )


@lru_cache(maxsize=1)
def rate_limiter() -> RateLimiter:
    return RateLimiter(redis_client(), get_settings().effective_rate_per_second)


@lru_cache(maxsize=1)
def cooloffs() -> CoolOffs:
    return CoolOffs(redis_client())


def warm_up() -> None:
    """Connect to Postgres and Redis now; a failure here is left for the first task to report."""
    try:
        with engine().connect() as conn:
            conn.exec_driver_sql("SELECT 1")
        rate_limiter().ping()
    except Exception:  # noqa: BLE001 - the task that needs the connection will raise it properly
        pass
    esms_client()
