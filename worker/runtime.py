"""The worker's shared resources: database engine, HTTP client, Redis client and limiter, made once.

A worker is one process whose polls run as greenlets (worker.green), so these are shared by every
poll in flight and sized by what is in flight, not by a process count: the HTTP pool holds one
connection per concurrent request, the database pool a handful (a poll holds a connection only
for its two short transactions, never while it waits for its slot or the provider), Redis a few
more (three short calls per poll). Built lazily, in the process that uses them, and never in
Flower, beat or `celery inspect`, which import the app but poll nothing.
"""

from __future__ import annotations

from functools import lru_cache

import httpx
import redis
from sqlalchemy import Engine

from worker.clocks import TickGate
from worker.cooloff import CoolOffs
from worker.esms_client import EsmsClient
from worker.notfound import NotFoundTracker
from worker.ratelimit import RateLimiter, RatePolicy
from worker.settings import get_settings
from worker.store import make_engine

# Connections a worker keeps open, and no more: a connection SQLAlchemy opens past the pool is
# closed again at its return, so under load each such checkout would cost Postgres a new
# backend (fork, catalog caches, prepared statements again). A poll waits for a free connection
# instead. (With four busy accounts on two cores the run without overflow was as fast as the
# one with it, 0.25 against 0.26 of the ceiling, one run each: the change bounds connections,
# it did not measurably speed anything up.)
_DATABASE_CONNECTIONS = 10
_REDIS_CONNECTIONS = 32


@lru_cache(maxsize=1)
def engine() -> Engine:
    return make_engine(
        get_settings(),
        pool_size=_DATABASE_CONNECTIONS,
        max_overflow=0,
        for_polling=True,
        application_name="esms-worker",
    )


@lru_cache(maxsize=1)
def esms_client() -> EsmsClient:
    settings = get_settings()
    return EsmsClient(
        settings.esms_base_url,
        settings.esms_timeout_seconds,
        max_connections=settings.pool_size,
    )


@lru_cache(maxsize=1)
def redis_client() -> redis.Redis:
    # Blocking: a greenlet waits for a free connection instead of opening one more.
    pool = redis.BlockingConnectionPool.from_url(
        get_settings().redis_url.get_secret_value(),
        max_connections=_REDIS_CONNECTIONS,
        timeout=5,
        socket_timeout=5,
        socket_connect_timeout=5,
        health_check_interval=30,
    )
    return redis.Redis(connection_pool=pool)


@lru_cache(maxsize=1)
def webhook_client() -> httpx.Client:
    # One POST at a time (worker.webhook); no redirects, which could carry the body elsewhere.
    return httpx.Client(limits=httpx.Limits(max_connections=1), follow_redirects=False)


@lru_cache(maxsize=1)
def rate_limiter() -> RateLimiter:
    return RateLimiter(redis_client(), RatePolicy.from_settings(get_settings()))


@lru_cache(maxsize=1)
def cooloffs() -> CoolOffs:
    return CoolOffs(redis_client())


@lru_cache(maxsize=1)
def tick_gate() -> TickGate:
    return TickGate(redis_client(), get_settings().schedule_tick_seconds)


@lru_cache(maxsize=1)
def notfound() -> NotFoundTracker:
    return NotFoundTracker(redis_client(), get_settings())


def warm_up() -> None:
    """Connect to Postgres and Redis now, so the first poll leaves on time; a failure here is
    left for the first task to report."""
    try:
        with engine().connect() as conn:
            conn.exec_driver_sql("SELECT 1")
        rate_limiter().ping()
    except Exception:  # noqa: BLE001 - the task that needs the connection will raise it properly
        pass
    esms_client()
