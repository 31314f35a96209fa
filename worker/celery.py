"""The Celery app and its whole runtime configuration: `celery -A worker worker|beat|flower`.

Everything a reader needs to know about how tasks run is in this file. The bare
`celery -A worker worker` reaches full throughput: the work is waiting on HTTP, so a pool of
threads in one process keeps enough requests in flight for the rate budget at little memory.
"""

from __future__ import annotations

from datetime import timedelta

from celery import Celery
from kombu import Queue

from worker.settings import get_settings

settings = get_settings()

app = Celery("worker", include=["worker.tasks"])
app.conf.update(
    broker_url=settings.redis_url.get_secret_value(),
    broker_connection_retry_on_startup=True,
    # Redis redelivers an unacknowledged task after this long; it must exceed the longest task
    # (limiter wait + request timeout + write, well under a minute) so a slow task is not run
    # twice. A lost batch does not wait for this: its Postgres lease expires first.
    broker_transport_options={"visibility_timeout": 300},
    # Scheduling ticks get a queue of their own: behind a queue full of polls that wait for
    # their rate slot, a tick would come too late to refill the pipeline before it runs dry.
    task_queues=[Queue("esms.schedule"), Queue("esms")],
    task_default_queue="esms",
    task_routes={"esms.schedule": {"queue": "esms.schedule"}},
    task_serializer="json",
    accept_content=["json"],
    # Results live in Postgres; nothing reads Celery results.
    task_ignore_result=True,
    # Acknowledge after the task ran, and requeue it if the worker process dies mid-task: a
    # redelivered poll finds its lease gone and does nothing, a lost one is retaken by the lease.
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    # One task reserved per thread: the queue stays in Redis where every worker can take from it.
    worker_prefetch_multiplier=1,
    # One process per in-flight request, enough of them to keep rate × (slowest response +
    # write) requests in flight. Processes, not threads: a request must leave the moment its
    # rate slot comes, and a thread that wakes for its slot can wait many GIL switches while
    # other threads parse answers, which bunches requests at the provider (measured: up to
    # 100 ms late with 24 threads, under 15 ms with one sender per process).
    worker_pool="prefork",
    worker_concurrency=settings.pool_processes,
    # Flower sees tasks as soon as they are sent, not only when a worker starts them.
    worker_send_task_events=True,
    task_send_sent_event=True,
    timezone="UTC",
    enable_utc=True,
    beat_schedule={
        "schedule-due-batches": {
            "task": "esms.schedule",
            "schedule": timedelta(seconds=settings.schedule_tick_seconds),
            # A tick nobody ran in time is worthless: the next one does the same work.
            "options": {"expires": max(2 * settings.schedule_tick_seconds, 2.0)},
        },
    },
)
