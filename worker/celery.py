"""The Celery app and its whole runtime configuration: `celery -A worker worker|beat|flower`.

Everything a reader needs to know about how tasks run is in this file. The bare
`celery -A worker worker` reaches full throughput: one process on Celery's gevent pool (see
worker.green for how it gets there) runs up to WORKER_CONCURRENCY polls at once, each a greenlet
that waits for its rate slot, the provider and Postgres without holding a process. The signal
handlers at the end give worker and beat the LOG_FORMAT (worker.logging_setup), make both refuse
to start on a schema revision this release does not know (worker.schema), and give the worker
its metrics endpoint (worker.metrics) and one line naming its accounts.
`RedisTransport` is kombu's Redis transport with one crash on a lost broker connection repaired.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from datetime import timedelta

from celery import Celery
from celery.signals import (
    after_setup_logger,
    after_setup_task_logger,
    beat_init,
    celeryd_after_setup,
    worker_ready,
)
from celery.utils.log import get_multiprocessing_logger
from kombu import Queue
from kombu.transport import redis as kombu_redis

from worker import logging_setup, metrics, schema
from worker.settings import get_settings
from worker.upkeep import UPKEEP_SECONDS

settings = get_settings()
log = logging.getLogger(__name__)


class RedisTransport(kombu_redis.Transport):
    """kombu's Redis transport, except that a lost connection cannot stop the worker for good,
    and that a channel does not build a redis-py client for every message it sends.

    When the broker goes away (a Redis restart), Celery closes the channel and detaches it from
    the transport; tasks that were running then still acknowledge their messages (late acks)
    through that channel, and closing it tries to put unacknowledged messages back. With kombu
    5.7 each of these raises AttributeError on the detached channel, and Celery 5.7 takes that
    for an unrecoverable error: the worker stops consuming while its process stays up. Nothing
    can be sent through a dead connection anyway, so these become no-ops: Redis hands out an
    unacknowledged task again after the visibility timeout, where it finds its batch gone, and
    a batch's Postgres lease returns its RefIds sooner.

    kombu's channel builds a new redis-py client for each message it sends without one at hand:
    every task queued and each of the four Celery events of a poll (sent, received, started,
    succeeded). Building one costs 176 µs, more than the publish it is for (109 µs); a client
    holds no connection of its own (each command borrows one from the pool), so the channel
    keeps one per connection pool and uses it again.
    """

    class Channel(kombu_redis.Channel):
        _shared_client = None

        @contextmanager
        def conn_or_acquire(self, client=None):
            if client:
                yield client
                return
            shared = self._shared_client
            # A pool dropped after a lost connection is replaced by a new one: so is the client.
            if shared is None or shared.connection_pool is not self.pool:
                shared = self._shared_client = self._create_client()
            yield shared

        class QoS(kombu_redis.QoS):
            def _detached(self) -> bool:
                transport = self.channel.connection
                return transport is None or transport.client is None

            def ack(self, delivery_tag):
                if not self._detached():
                    super().ack(delivery_tag)

            def reject(self, delivery_tag, requeue=False):
                if not self._detached():
                    super().reject(delivery_tag, requeue)

            def restore_unacked(self, client=None):
                if not self._detached():
                    return super().restore_unacked(client)
                return None


_broker_url = settings.redis_url.get_secret_value()

# With FINAL_WEBHOOK_URL, beat queues a webhook run every second; a run that finds another one
# running, or a backoff after a failed POST, does nothing (worker.webhook), so runs that waited
# in the queue while the workers were away cost a read each. (No `expires`, for the reason
# given at the scheduling tick below.)
_WEBHOOK_SCHEDULE = (
    {
        "post-final-events": {
            "task": "esms.webhook",
            "schedule": timedelta(seconds=1),
        }
    }
    if settings.final_webhook_url
    else {}
)

app = Celery("worker", include=["worker.tasks"])
app.conf.update(
    broker_url=_broker_url,
    # The repaired transport for redis:// and rediss:// URLs (see RedisTransport above).
    broker_transport=(
        "worker.celery:RedisTransport" if _broker_url.startswith(("redis:", "rediss:")) else None
    ),
    broker_connection_retry_on_startup=True,
    # Redis redelivers an unacknowledged task after this long; it must exceed the longest task
    # (limiter wait + request timeout + write, well under a minute) so a slow task is not run
    # twice. A lost batch does not wait for this: its Postgres lease expires first.
    # The socket options bound every broker call: a Redis whose network path died with the
    # connection open would otherwise hold the consumer (and beat's publisher) for good.
    broker_transport_options={
        "visibility_timeout": 300,
        "socket_timeout": 10,
        "socket_connect_timeout": 5,
        "socket_keepalive": True,
        "health_check_interval": 10,
    },
    # Scheduling ticks get a queue of their own: behind a queue full of polls that wait for
    # their rate slot, a tick would come too late to refill the pipeline before it runs dry.
    # The webhook's runs too, so that they never wait behind polls nor polls behind them; a run
    # holds one greenlet of the pool (worker.webhook: one at a time).
    task_queues=[Queue("esms.schedule"), Queue("esms.webhook"), Queue("esms")],
    task_default_queue="esms",
    task_routes={
        "esms.schedule": {"queue": "esms.schedule"},
        "esms.upkeep": {"queue": "esms.schedule"},
        "esms.webhook": {"queue": "esms.webhook"},
    },
    task_serializer="json",
    accept_content=["json"],
    # Results live in Postgres; nothing reads Celery results.
    task_ignore_result=True,
    # Acknowledge after the task ran, and requeue it if the worker process dies mid-task: a
    # redelivered poll finds its lease gone and does nothing, a lost one is retaken by the lease.
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    # One task reserved per greenlet: the rest of the queue stays in Redis, where every worker
    # can take from it.
    worker_prefetch_multiplier=1,
    # Polls are greenlets of one process: a poll spends its life waiting (rate slot, provider,
    # Postgres), and one hub thread wakes each the moment its slot comes, with no GIL hand-off
    # between threads to make it late. The pool is named on the command line, where Celery
    # patches for it (worker.green adds `--pool=gevent` to a bare `celery worker`): the
    # `worker_pool` setting would pick the pool too late to patch. The pool has room for every
    # batch the scheduler may queue for every account (Settings.pool_size), so a tick never
    # waits behind polls that wait for their rate slots; an idle account costs no greenlet.
    worker_concurrency=settings.pool_size,
    # Flower sees tasks as soon as they are sent, not only when a worker starts them.
    worker_send_task_events=True,
    task_send_sent_event=True,
    timezone="UTC",
    enable_utc=True,
    beat_schedule={
        "schedule-due-batches": {
            "task": "esms.schedule",
            "schedule": timedelta(seconds=settings.schedule_tick_seconds),
            # No `expires`: Celery makes it an absolute time on beat's clock, and a worker whose
            # clock runs ahead would discard every tick. Old ticks are skipped by the tick gate
            # on Redis's clock instead (worker.clocks).
        },
        "upkeep": {
            "task": "esms.upkeep",
            "schedule": timedelta(seconds=UPKEEP_SECONDS),
        },
        **_WEBHOOK_SCHEDULE,
    },
)


# Sent by `celery worker` and `celery beat` once Celery made its handlers (Flower logs its own way).
@after_setup_logger.connect
def _log_format(logger, **_kwargs) -> None:
    logging_setup.install(logger, settings)
    # Pool start-up errors go through billiard's logger, which has handlers of its own.
    if get_multiprocessing_logger() is not None:
        logging_setup.install(get_multiprocessing_logger(), settings)


@after_setup_task_logger.connect
def _task_log_format(logger, **_kwargs) -> None:
    logging_setup.install(logger, settings)


@worker_ready.connect
def _metrics_endpoint(**_kwargs) -> None:
    metrics.serve(settings)


def _require_known_schema(program: str) -> None:
    """Exit with status 1 and one log line when the database's schema is not this release's."""
    try:
        schema.verify(settings)
    except schema.SchemaMismatch as mismatch:
        log.critical("%s refuses to start: %s", program, mismatch)
        # SystemExit, not an exception: Celery would log an exception with its traceback.
        raise SystemExit(1) from None


# Sent in the worker's final process (after the re-execution onto gevent, worker.green) once its
# logging is set up, before it consumes anything.
@celeryd_after_setup.connect
def _worker_schema_check(**_kwargs) -> None:
    _require_known_schema("celery worker")


@beat_init.connect
def _beat_schema_check(**_kwargs) -> None:
    _require_known_schema("celery beat")


@worker_ready.connect
def _log_accounts(**_kwargs) -> None:
    # Names only: which accounts this worker polls is what an operator checks after adding or
    # renaming one (rows of an account no worker has are reported by the scheduler).
    names = sorted(settings.accounts)
    if names:
        log.info("accounts configured: %s", ", ".join(names))
    else:
        log.warning(
            "no account configured (ESMS_API_KEY/ESMS_SECRET_KEY or ESMS_ACCOUNTS): "
            "nothing will be polled"
        )
