"""The worker's Redis transport (worker.celery.RedisTransport) over a real Redis: a channel sends
every message through one redis-py client per connection pool instead of building one each
time, and still delivers them all."""

from __future__ import annotations

import pytest
from kombu import Connection, Exchange, Queue

from worker.settings import get_settings


@pytest.fixture
def transport():
    # worker.celery reads the settings as it is imported: not at collection, and not cached
    # for the tests that run after this one.
    from worker.celery import RedisTransport

    yield RedisTransport
    get_settings.cache_clear()


def test_a_channel_sends_every_message_through_one_client(redis_url, monkeypatch, transport):
    RedisTransport = transport
    built = []
    create = RedisTransport.Channel._create_client

    def counting(self, asynchronous=False):
        client = create(self, asynchronous=asynchronous)
        if not asynchronous:
            built.append(client)
        return client

    monkeypatch.setattr(RedisTransport.Channel, "_create_client", counting)
    queue = Queue("transport-test", Exchange("transport-test"), routing_key="transport-test")
    with Connection(redis_url, transport=RedisTransport) as connection:
        channel = connection.channel()
        producer = connection.Producer(channel)
        for n in range(5):
            producer.publish({"n": n}, exchange=queue.exchange, routing_key="transport-test",
                             declare=[queue])  # fmt: skip
        assert len(built) == 1
        # kombu drops its pools after a lost connection: the next message gets a client of the
        # new pool, not the old one.
        old_pool = channel.pool
        channel._pool = None
        producer.publish({"n": 5}, exchange=queue.exchange, routing_key="transport-test")
        assert len(built) == 2 and built[1].connection_pool is channel.pool is not old_pool
        received = []
        with connection.SimpleQueue(queue) as simple:
            for _ in range(6):
                message = simple.get(timeout=5)
                received.append(message.payload["n"])
                message.ack()
        channel.close()
    assert sorted(received) == list(range(6))
