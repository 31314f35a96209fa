"""Which commands `worker.green` re-executes on the gevent pool, and which it leaves alone."""

from __future__ import annotations

import sys

import pytest

from worker.green import gevent_command

CELERY = "/opt/venv/bin/celery"


@pytest.mark.parametrize(
    "argv",
    [
        [CELERY, "-A", "worker", "worker"],
        [CELERY, "--app", "worker", "worker", "--loglevel=INFO", "-n", "w1@%h"],
        [CELERY, "-A", "worker", "-b", "redis://x/0", "worker", "-c", "50"],
        [CELERY, "--app=worker", "worker", "--hostname", "a@b"],
        ["/usr/lib/python3/site-packages/celery/__main__.py", "-A", "worker", "worker"],
    ],
)
def test_a_bare_worker_is_run_again_on_gevent(argv):
    command = gevent_command(argv)
    assert command[:3] == [sys.executable, "-m", "celery"]
    assert command[3:] == [*argv[1:], "--pool=gevent", "--without-mingle"]


@pytest.mark.parametrize(
    "argv",
    [
        [CELERY, "-A", "worker", "worker", "-P", "gevent"],
        [CELERY, "-A", "worker", "worker", "-Pprefork"],
        [CELERY, "-A", "worker", "worker", "--pool", "solo"],
        [CELERY, "-A", "worker", "worker", "--pool=threads"],
        [CELERY, "-A", "worker", "beat"],
        [CELERY, "-A", "worker", "flower"],
        [CELERY, "-A", "worker", "inspect", "active"],
        [CELERY, "-A", "worker", "worker", "--help"],
        ["/x/bin/pytest", "-A", "worker", "worker"],
        ["/x/bin/esms-poller", "status"],
        [],
    ],
)
def test_anything_else_is_left_alone(argv):
    assert gevent_command(argv) is None


def test_mingle_named_by_the_operator_is_kept():
    command = gevent_command([CELERY, "-A", "worker", "worker", "--without-mingle"])
    assert command[-2:] == ["--without-mingle", "--pool=gevent"]
